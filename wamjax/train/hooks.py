"""What the training loop runs besides the step: per-stage hooks (evaluations) built from the stage's context.

The loop knows no evaluation; callers pass hook factories (`wamjax.eval.hooks.loop_hooks()` does what
`config.eval` asks for), and `wamjax.main` passes those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import ml_collections

from wamjax.models.config import ModelConfig
from wamjax.stages import StageSpec

Params = Any


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a hook may use of the running stage: its spec, the run config, frozen encoders, mesh, stats and
    writer."""

    config: ml_collections.ConfigDict  # the whole run config (evaluation schedules: `eval.*`)
    spec: StageSpec
    text: Any
    mesh: jax.sharding.Mesh
    rules: Any
    vae_params: Params
    norm_stats: dict[str, Any]
    writer: Any
    workdir: str

    @property
    def stage(self) -> str:
        return self.spec.name

    @property
    def model(self) -> ModelConfig:
        return self.spec.model

    @property
    def vae(self) -> Any:
        return self.spec.vae

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def clean_context_frames(self) -> int:
        return self.spec.clean_context_frames


class LoopHook(Protocol):
    """Runs after a step when its schedule says so; returns the metrics row it wrote, if any."""

    def maybe_run(self, step: int, params: Params, stage_ends: bool) -> dict[str, Any] | None: ...


HookFactory = Callable[[StageContext], LoopHook | None]


def requested_evaluations(config: ml_collections.ConfigDict) -> list[str]:
    """The `eval.*` schedules the config turns on (each needs a hook to run)."""
    ev = config.get("eval")
    if ev is None:
        return []
    return [f"eval.{key}={ev.get(key)}" for key in ("every_steps", "closed_loop_every_steps")
            if int(ev.get(key, 0) or 0) > 0]


def check_hooks(config: ml_collections.ConfigDict, hooks: Sequence[HookFactory] | None) -> None:
    """Raises when the config schedules evaluations and the caller passed no hooks to run them."""
    asked = requested_evaluations(config)
    if asked and hooks is None:
        raise ValueError(f"{', '.join(asked)} schedules evaluation, but train() was given no hooks to run it: "
                         "pass hooks=wamjax.eval.hooks.loop_hooks() (wamjax.main does), or set them to 0")
