"""Closed-loop evaluation from the training loop: the current params act in a spawned simulator on
`config.eval`'s schedule."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from wamjax.checkpoint.norm_stats import checked_norm_stats
from wamjax.diffusion.sampler import SamplerOptions
from wamjax.eval.agents import PolicyAgent
from wamjax.eval.rollout import evaluate, format_table
from wamjax.eval.sim_process import SpawnedTask
from wamjax.inference.policy import Policy
from wamjax.sim import metaworld_env


class LoopClosedLoop:
    """Closed-loop evaluation from the training loop: every `eval.closed_loop_every_steps` steps of a stage with
    actions and at its end, the current params act in the simulator (`SpawnedTask`); writes a `closed_loop`
    row (success rate, mean steps and return per task and overall) and videos under WORKDIR/closed_loop/."""

    def __init__(self, config: Any, stage: str, norm_stats: dict[str, Any] | None, writer: Any, workdir: str):
        ev = config.eval
        self.every = int(ev.closed_loop_every_steps)
        if ev.closed_loop_env != "metaworld":
            raise ValueError(f"eval.closed_loop_env={ev.closed_loop_env!r}; expected 'metaworld'")
        self.tasks = [t.strip() for t in str(ev.closed_loop_tasks).split(",") if t.strip()]
        try:
            metaworld_env.check_tasks(self.tasks)
        except ValueError as e:
            raise ValueError(f"eval.closed_loop_tasks={ev.closed_loop_tasks!r}: {e}") from None
        for key in ("closed_loop_episodes", "closed_loop_num_steps"):
            if int(ev[key]) < 1:
                raise ValueError(f"eval.{key}={ev[key]}; expected >= 1")
        if not 1 <= int(ev.closed_loop_max_steps) <= metaworld_env.MAX_EPISODE_STEPS:
            raise ValueError(f"eval.closed_loop_max_steps={ev.closed_loop_max_steps}; expected 1 to "
                             f"{metaworld_env.MAX_EPISODE_STEPS}")
        if len(tuple(ev.closed_loop_resolution)) != 2:
            raise ValueError(f"eval.closed_loop_resolution={ev.closed_loop_resolution}; expected (H, W)")
        norm_stats = checked_norm_stats(config, norm_stats, where=f"stage {stage!r} of this run")
        known = sorted(norm_stats.get("datasets", {}))
        if known and ev.closed_loop_dataset not in known:
            raise KeyError(f"eval.closed_loop_dataset={ev.closed_loop_dataset!r} has no normalization stats in "
                           f"this run; it has {known}")
        self.dataset = str(ev.closed_loop_dataset) if known else None  # synthetic data: actions as predicted
        self.config, self.stage, self.ev = config, stage, ev
        self.norm_stats, self.writer, self.workdir = norm_stats, writer, str(workdir)
        self.policy: Any = None

    @classmethod
    def maybe(cls, config: Any, stage: str, stage_mode: str, *args: Any) -> LoopClosedLoop | None:
        """An evaluator when `eval.closed_loop_every_steps` > 0 and the stage trains actions, else None."""
        ev = config.get("eval")
        if ev is None or int(ev.get("closed_loop_every_steps", 0)) <= 0 or stage_mode != "joint":
            return None
        if jax.process_count() > 1:
            raise ValueError(f"eval.closed_loop_every_steps runs the simulator beside a single-process run; this "
                             f"run has {jax.process_count()} processes (evaluate its checkpoints with "
                             "python -m wamjax.eval.closed_loop instead)")
        return cls(config, stage, *args)

    def maybe_run(self, step: int, params: Any, stage_ends: bool, log: Any = logging.info) -> dict[str, Any] | None:
        """Evaluates when `step` is due (or the stage ends); returns the row written, if any."""
        if not (step % self.every == 0 or stage_ends):
            return None
        ev, start = self.ev, time.perf_counter()
        params = jax.device_get(params)  # off the training mesh: the policy runs on one device
        if self.policy is None:
            options = SamplerOptions(num_steps=int(ev.closed_loop_num_steps),
                                     shift=float(self.config.diffusion.shift))
            self.policy = Policy(self.config, params, self.norm_stats, options=options, dataset=self.dataset)
        else:  # same shapes: the compiled policy step is reused
            self.policy.params = jax.tree.map(jnp.asarray, params)
        execute = int(ev.closed_loop_execute_actions) or None
        agent = PolicyAgent(self.policy, rollout="infer" if execute else "auto", execute=execute)
        agent.name = f"wam ({agent.rollout})"
        out = os.path.join(self.workdir, "closed_loop", f"step_{step}")
        summary = evaluate(
            agent, self.tasks, int(ev.closed_loop_episodes), seed=int(ev.closed_loop_seed),
            max_steps=int(ev.closed_loop_max_steps), resolution=tuple(int(v) for v in ev.closed_loop_resolution),
            camera=str(ev.closed_loop_camera), out_dir=out, log=log, make_env=SpawnedTask,
        )
        row: dict[str, Any] = {"event": "closed_loop", "kind": "closed_loop", "stage": self.stage, "step": int(step),
                               "out": out, "seconds": time.perf_counter() - start}
        for name, entry in [*summary["tasks"].items(), ("overall", summary["overall"])]:
            for key in ("success_rate", "mean_steps", "mean_return"):
                row[f"closed_loop/{name}/{key}"] = entry[key]
        self.writer.write_eval(row)
        log(f"closed-loop eval at step {step}:\n{format_table(summary, agent.name)}")
        return row
