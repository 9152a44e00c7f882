"""Per-stage latency of one inference call, in openpi's convention (`policy_timing`, milliseconds).

Stages follow one another without gaps, so they add up to `total_ms`: text encoding, image/VAE encoding (with
the host-side preparation of the frames and state), KV prefill (the cache of a chunk-causal rollout; 0 for a
full-sequence call), each denoising iteration (reported by the sampler's `STEP_CLOCK` as it finishes on the
device), and decode (what follows the last iteration: the video decode when asked for, the actions back on the
host and in raw units; for a KV-cache chunk also the forward that caches the chunk's own keys and values, which
runs inside the same compiled call).
"""

from __future__ import annotations

import time
from typing import Any

import jax

from wamjax.diffusion.sampler import STEP_CLOCK

STAGES = ("text_ms", "encode_ms", "prefill_ms", "denoise_ms", "decode_ms")


class StageTimer:
    """Marks the end of each stage of one call; `timing()` gives the `policy_timing` dict."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.ms = dict.fromkeys(STAGES, 0.0)
        self.steps_ms: list[float] = []
        self.skipped = 0

    def stage(self, name: str, ready: Any = None) -> None:
        """Ends stage `name` (adding to it) once `ready` (arrays of its outputs, if any) is computed."""
        if name not in self.ms:
            raise KeyError(f"stage {name!r}; expected one of {STAGES}")
        if ready is not None:
            jax.block_until_ready(ready)
        now = time.perf_counter()
        self.ms[name] += 1000.0 * (now - self.last)
        self.last = now

    def begin_denoising(self) -> None:
        """Call right before dispatching a sampler run with `time_steps=True`."""
        self._dispatched = time.perf_counter()
        STEP_CLOCK.start()

    def end_denoising(self, ready: Any) -> None:
        """Call with the sampler's outputs: splits the time since `begin_denoising` into its iterations; what
        follows the last iteration counts as decode."""
        jax.block_until_ready(ready)
        ticks = STEP_CLOCK.stop()
        previous = self._dispatched
        for _, skipped, t in ticks:
            self.steps_ms.append(1000.0 * (t - previous))
            self.skipped += int(skipped)
            previous = t
        if not ticks:  # a sampler without the step clock: one opaque denoising stage
            previous = time.perf_counter()
            self.steps_ms.append(1000.0 * (previous - self._dispatched))
        self.ms["denoise_ms"] += 1000.0 * (previous - self.last)
        self.last = previous

    def timing(self) -> dict[str, Any]:
        """{text_ms, encode_ms, prefill_ms, denoise_ms, decode_ms, total_ms, denoise_steps_ms [...], skipped_steps};
        call after the last stage."""
        return {**{k: float(v) for k, v in self.ms.items()},
                "total_ms": 1000.0 * (self.last - self.start),
                "denoise_steps_ms": [float(x) for x in self.steps_ms],
                "skipped_steps": int(self.skipped)}
