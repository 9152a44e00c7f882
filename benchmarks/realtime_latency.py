"""Chunk latency of a trained checkpoint under the real-time knobs: fewer action steps, Flash, DiT step caching.

    python benchmarks/realtime_latency.py --checkpoint=WORKDIR/checkpoints [--repeats=10] [--dataset=metaworld]

One row per setting, each `Policy.infer` on the checkpoint's own cameras (random frames; latency does not depend
on them) after a compiled first call: the median chunk latency, its speed-up over the first row (16 steps for
video and actions), the median of the per-stage breakdown every server reply carries (`policy_timing`:
encode, the denoising iterations, decode) and the number of iterations the step cache skipped.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from wamjax.eval.agents import stats_dataset
from wamjax.inference.policy import Policy

# (label, Policy.from_checkpoint knobs)
SETTINGS = (
    ("16 steps (video and actions)", {"num_steps": 16}),
    ("16 video / 4 action steps", {"num_steps": 16, "action_steps": 4}),
    ("16 video / 1 action step (Flash schedule)", {"num_steps": 16, "action_steps": 1, "video_stop_t": 0.65}),
    ("16 steps, fixed step cache (7 of 16 skipped)",
     {"num_steps": 16, "step_cache_mask": (True, True) + (True, False) * 7}),
    ("16 steps, dynamic step cache (cosine > 0.95)", {"num_steps": 16, "step_cache_threshold": 0.95}),
    ("4 steps", {"num_steps": 4}),
)


def observation(policy: Policy, rng: np.random.Generator) -> list[np.ndarray] | np.ndarray:
    h, w = policy.resolution
    frames = [rng.integers(0, 255, (h, w, 3), np.uint8) for _ in range(max(policy.num_cameras, 1))]
    return frames if len(frames) > 1 else frames[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default="metaworld")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    dataset = stats_dataset(args.checkpoint, args.dataset)
    print(f"backend: {jax.default_backend()}  device: {jax.devices()[0].device_kind}  jax {jax.__version__}")
    print("| setting | median ms / chunk | speed-up | encode ms | denoising ms (iterations, skipped) | decode ms |")
    print("|---|---|---|---|---|---|")
    baseline = None
    rng = np.random.default_rng(0)
    for label, knobs in SETTINGS:
        policy = Policy.from_checkpoint(args.checkpoint, dataset=dataset, **knobs)
        frames = observation(policy, rng)
        proprio = np.zeros(policy.proprio_dim, np.float32)
        policy.infer(frames, proprio, "press the button")  # compiles
        times, timings = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            policy.infer(frames, proprio, "press the button")
            times.append(time.perf_counter() - start)
            timings.append(policy.last_timing)
        median = 1000 * float(np.median(times))
        baseline = baseline or median
        stage = lambda key, ts=timings: float(np.median([t[key] for t in ts]))  # noqa: E731
        iterations = len(timings[-1]["denoise_steps_ms"])
        print(f"| {label} | {median:.1f} | {baseline / median:.1f}x | {stage('encode_ms'):.1f} | "
              f"{stage('denoise_ms'):.1f} ({iterations}, {timings[-1]['skipped_steps']}) | {stage('decode_ms'):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
