"""The evaluations the training loop runs on `config.eval`'s schedule: offline metrics on held-out clips and
closed-loop rollouts in the simulator."""

from __future__ import annotations

from wamjax.eval.offline import LoopEvaluator
from wamjax.train.hooks import HookFactory, LoopHook, StageContext


def offline_hook(ctx: StageContext) -> LoopHook | None:
    """Held-out clip metrics every `eval.every_steps` steps and at the stage's end (None when off)."""
    return LoopEvaluator.maybe(ctx.config, ctx.spec, ctx.text, ctx.mesh, ctx.rules, ctx.vae_params,
                               ctx.norm_stats, ctx.writer, ctx.workdir)


def closed_loop_hook(ctx: StageContext) -> LoopHook | None:
    """Simulator rollouts every `eval.closed_loop_every_steps` steps (None when off)."""
    ev = ctx.config.get("eval")
    if ev is None or int(ev.get("closed_loop_every_steps", 0)) <= 0:
        return None
    from wamjax.eval.closed_loop_hook import LoopClosedLoop  # imports the simulator (MuJoCo): only when asked for

    return LoopClosedLoop.maybe(ctx.config, ctx.stage, ctx.mode, ctx.norm_stats, ctx.writer, ctx.workdir)


def loop_hooks() -> list[HookFactory]:
    """Every evaluation `config.eval` can schedule, for `wamjax.train.loop.train(..., hooks=...)`."""
    return [offline_hook, closed_loop_hook]
