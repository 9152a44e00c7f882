"""Closed-loop episodes in Meta-World: an agent acts a chunk, the simulator runs it, the agent observes and
replans; success rate, steps and return per task, a results table, one video per episode."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from data_pipelines.make_videos import write_video
from wamjax.sim import metaworld_env

DEFAULT_EVAL_SEED = 1000  # collection uses seed 0: evaluation variants differ


class Agent(Protocol):
    """What the loop drives: a chunk of 4-D actions per call, then the frames seen while it ran."""

    name: str

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None: ...

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray: ...

    def observe(self, frames: list[np.ndarray]) -> None: ...


@dataclasses.dataclass
class EpisodeResult:
    """One closed-loop episode."""

    task: str
    seed: int
    variant: int
    success: bool
    steps: int  # environment steps executed
    steps_to_success: int | None
    episode_return: float
    seconds: float
    video: str | None = None
    chunks: int = 0  # action chunks the agent produced
    actions: int = 0  # actions in them (environment steps they span)
    act_seconds: float = 0.0  # time spent in the agent's act(): inference, for a policy
    # A simulated robot stepping at the agent's control_hz: seconds it waited for actions, and moved.
    idle_seconds: float | None = None
    moving_seconds: float | None = None


def run_episode(
    agent: Agent, env: metaworld_env.MetaWorldTask, seed: int, variant: int, max_steps: int
) -> tuple[EpisodeResult, np.ndarray]:
    """Runs `agent` on one variant until success or `max_steps`; returns the result and the frames [T, H, W, 3]."""
    start = time.perf_counter()
    env.reset(seed, variant)
    frame = env.render()
    frames = [frame]
    agent.reset(env, metaworld_env.instruction(env.task), frame)
    steps, episode_return, success_step, done = 0, 0.0, None, False
    chunks, num_actions, act_seconds = 0, 0, 0.0
    while not done:
        act_start = time.perf_counter()
        chunk = np.asarray(agent.act(env, frame), np.float32)
        act_seconds += time.perf_counter() - act_start
        chunks += 1
        num_actions += len(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != 4 or len(chunk) == 0:
            raise ValueError(f"{agent.name} returned actions of shape {chunk.shape}; expected [k >= 1, 4]")
        seen = []
        for action in chunk:
            result = env.step(action)
            steps += 1
            episode_return += result.reward
            frame = env.render()
            frames.append(frame)
            seen.append(frame)
            if result.success:
                success_step = steps
            if result.success or result.truncated or steps >= max_steps:
                done = True
                break
        if not done:
            agent.observe(seen)
    result = EpisodeResult(
        task=env.task, seed=seed, variant=variant, success=success_step is not None, steps=steps,
        steps_to_success=success_step, episode_return=float(episode_return), seconds=time.perf_counter() - start,
        chunks=chunks, actions=num_actions, act_seconds=act_seconds,
    )
    control_hz = getattr(agent, "control_hz", None)
    if control_hz:  # an agent that does not count its idle time keeps the robot waiting through every act()
        result.idle_seconds = float(getattr(agent, "idle_seconds", act_seconds))
        result.moving_seconds = steps / float(control_hz)
    return result, np.stack(frames)


def control_frequency(rows: Sequence[EpisodeResult]) -> dict[str, float | None]:
    """chunks_per_s and actions_per_s: what the agent produced per second spent in its act() (None: no time)."""
    seconds = sum(r.act_seconds for r in rows)
    if seconds <= 0:
        return {"chunks_per_s": None, "actions_per_s": None}
    out = {"chunks_per_s": sum(r.chunks for r in rows) / seconds,
           "actions_per_s": sum(r.actions for r in rows) / seconds}
    if all(r.idle_seconds is not None for r in rows):
        idle = sum(r.idle_seconds for r in rows)
        out["idle_fraction"] = idle / max(idle + sum(r.moving_seconds for r in rows), 1e-12)
    return out


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Per-task and overall success rate, mean steps (to success, and overall) and mean return."""

    def block(rows: Sequence[EpisodeResult]) -> dict[str, Any]:
        successes = [r for r in rows if r.success]
        return {
            "episodes": len(rows),
            "successes": len(successes),
            "success_rate": len(successes) / len(rows),
            "mean_steps_to_success": float(np.mean([r.steps_to_success for r in successes])) if successes else None,
            "mean_steps": float(np.mean([r.steps for r in rows])),
            "mean_return": float(np.mean([r.episode_return for r in rows])),
            # Control frequency: chunks and (environment-step) actions the agent delivers per second it computes.
            **control_frequency(rows),
        }

    tasks = list(dict.fromkeys(r.task for r in results))
    summary = {task: block([r for r in results if r.task == task]) for task in tasks}
    for task in tasks:
        summary[task]["episode_results"] = [dataclasses.asdict(r) for r in results if r.task == task]
    return {"tasks": summary, "overall": block(results)}


def format_table(summary: dict[str, Any], policy_name: str) -> str:
    """The summary as a fixed-width table, one row per task and an overall row."""
    header = ("task", "policy", "episodes", "success rate", "steps to success", "mean steps", "mean return",
              "chunks/s", "actions/s", "idle")
    rows = []
    for task, entry in [*summary["tasks"].items(), ("overall", summary["overall"])]:
        to_success = entry["mean_steps_to_success"]
        rate = lambda key: "-" if entry.get(key) is None else f"{entry[key]:.1f}"  # noqa: B023
        rows.append((
            task, policy_name, str(entry["episodes"]),
            f"{entry['successes']}/{entry['episodes']} ({entry['success_rate']:.0%})",
            "-" if to_success is None else f"{to_success:.1f}", f"{entry['mean_steps']:.1f}",
            f"{entry['mean_return']:.1f}", rate("chunks_per_s"), rate("actions_per_s"),
            "-" if entry.get("idle_fraction") is None else f"{entry['idle_fraction']:.0%}",
        ))
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def evaluate(
    agent: Agent,
    tasks: Sequence[str],
    episodes: int,
    *,
    seed: int = DEFAULT_EVAL_SEED,
    max_steps: int = metaworld_env.MAX_EPISODE_STEPS,
    resolution: tuple[int, int] = (128, 128),
    camera: str = metaworld_env.DEFAULT_CAMERA,
    out_dir: str | None = None,
    video_fps: int = 30,
    log: Any = print,
    make_env: Callable[..., Any] = metaworld_env.MetaWorldTask,
) -> dict[str, Any]:
    """Runs `episodes` episodes of each task; returns the summary (and writes it, and videos, to `out_dir`).

    `make_env(task, resolution=, camera=)` builds each task's environment: `SpawnedTask` simulates in a child
    process (for callers that have TensorFlow loaded)."""
    metaworld_env.check_tasks(list(tasks))
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if not 1 <= max_steps <= metaworld_env.MAX_EPISODE_STEPS:
        raise ValueError(f"--max_steps must be in [1, {metaworld_env.MAX_EPISODE_STEPS}], got {max_steps}")
    if out_dir:
        os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    results = []
    for task in tasks:
        with make_env(task, resolution=resolution, camera=camera) as env:
            for variant in range(episodes):
                result, frames = run_episode(agent, env, seed, variant, max_steps)
                if out_dir:
                    result.video = os.path.join("videos", f"{task}_seed{seed}_variant{variant:03d}.mp4")
                    write_video(os.path.join(out_dir, result.video), frames, video_fps)
                results.append(result)
                outcome = f"success in {result.steps_to_success} steps" if result.success else "no success"
                log(f"{task} episode {variant + 1}/{episodes} (variant {variant} of seed {seed}): {outcome}, "
                    f"{result.steps} steps, return {result.episode_return:.1f}, {result.seconds:.1f} s")
    summary = summarize(results)
    summary["config"] = {"policy": agent.name, "seed": seed, "max_steps": max_steps,
                         "resolution": list(resolution), "camera": camera}
    if out_dir:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary
