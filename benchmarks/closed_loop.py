"""Does a world-action model trained here look before it acts? The perception benchmark on the CPU lab model.

    python benchmarks/closed_loop.py [--tasks=button-press-topdown-v3,reach-v3,push-v3] [--episodes=30] \
        [--steps=3000] [--eval_episodes=20] [--max_steps=200] [--rows=...] [--workdir=DIR] [--out=DIR]

One command, each phase a subprocess of the repository's own CLIs (what a user would run):
  collect   scripted-expert episodes of every task on training variants (MT1 seed 0), both cameras, 64x64;
  stats     their normalization statistics;
  encode    a latents cache of the lab config (configs/lab.py: raw pixel patches, both cameras as views), so
            the training step runs the DiT alone;
  train     one multi-task lab model (the task string is the instruction), action tuning from scratch;
  evaluate  closed loop on held-out variants (MT1 seed 1000) through `wamjax.eval.closed_loop`, one row each:
            expert, random, replay (one expert episode's actions, blind), wam_joint, wam_imagine_then_act, and
            wam_vision_ablated (the same checkpoint, joint, with a black frame in place of both cameras).
Prints a table of success per task and row, the training step's time split (model step vs waiting for data;
the pixel encoder costs no FLOPs) and the wall clock of each phase; `--out=DIR` writes `DIR/results.json`
(per task, per row: episodes, successes, success_rate; plus timings) and the episode videos of every row.
Existing phases in --workdir are reused (delete a folder to redo it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
LAB = os.path.join(REPO, "configs", "lab.py")
ROWS = ("expert", "random", "replay", "wam_joint", "wam_imagine_then_act", "wam_vision_ablated")


def run(args: list[str], label: str) -> float:
    """Runs `python ARGS` in the repository; returns its wall seconds (raises with its output on failure)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    print(f"[{label}] {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"{label} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    print(f"[{label}] done in {seconds:.0f} s", flush=True)
    return seconds


def lab_overrides(data_dir: str, stats_path: str, extra: Sequence[str] = ()) -> list[str]:
    """The lab config on a collected dataset."""
    return [f"--config={LAB}", f"--config.data.data_dir={data_dir}", f"--config.data.stats_path={stats_path}",
            *extra]


def collect(data_dir: str, tasks: Sequence[str], episodes: int, timings: dict, *, seed: int = 0) -> str:
    """Expert episodes of `tasks` under `data_dir` (reused when there) and their stats file."""
    if not os.path.exists(os.path.join(data_dir, "metaworld")):
        timings["collect"] = run(["-m", "wamjax.jobs.collect_sim", f"--tasks={','.join(tasks)}",
                                  f"--episodes={episodes}", "--resolution=64,64", f"--seed={seed}",
                                  f"--out={data_dir}"], "collect")
    stats_path = os.path.join(data_dir, "stats.json")
    if not os.path.exists(stats_path):
        run(["-m", "data_pipelines.compute_stats", f"--data_dir={data_dir}", "--datasets=metaworld",
             f"--out={stats_path}"], "stats")
    return stats_path


def encode(cache: str, overrides: list[str], num_batches: int, timings: dict, label: str = "encode") -> None:
    """The lab latents cache (reused when there)."""
    if not os.path.exists(os.path.join(cache, "latents_cache.json")):
        timings[label] = run(["-m", "wamjax.jobs.encode_latents", *overrides, f"--out={cache}",
                              f"--num_batches={num_batches}"], label)


def train(run_dir: str, overrides: list[str], timings: dict, label: str = "train") -> None:
    """A lab training run (reused when its checkpoints are there)."""
    if os.path.exists(os.path.join(run_dir, "checkpoints")):
        print(f"[{label}] reusing the trained run in {run_dir}", flush=True)
        return
    timings[label] = run(["-m", "wamjax.main", *overrides, f"--workdir={run_dir}"], label)


def closed_loop(policy_args: list[str], out: str, label: str, tasks: Sequence[str], episodes: int,
                max_steps: int) -> tuple[dict, float]:
    """`wamjax.eval.closed_loop` on held-out variants; (summary, seconds)."""
    if os.path.exists(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            return json.load(f), 0.0
    seconds = run(["-m", "wamjax.eval.closed_loop", f"--tasks={','.join(tasks)}", f"--episodes={episodes}",
                   f"--max_steps={max_steps}", "--resolution=64,64", f"--out={out}", *policy_args], label)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), seconds


def row_args(row: str, checkpoint: str, num_steps: int) -> list[str]:
    """The closed-loop flags of one benchmark row."""
    if row in ("expert", "random", "replay"):
        return [f"--policy={row}"]
    wam = [f"--checkpoint={checkpoint}", f"--num_steps={num_steps}"]
    return {
        "wam_joint": [*wam, "--mode=joint"],
        "wam_imagine_then_act": [*wam, "--mode=imagine_then_act"],
        "wam_vision_ablated": [*wam, "--mode=joint", "--vision_ablation=blank"],
    }[row]


def step_breakdown(run_dir: str) -> dict[str, float]:
    """Median training step time and the part of it spent waiting for data, from the run's metrics."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "loss" in r and "data_s_per_step" in r][1:]  # the first holds the compile
    if not rows:
        return {}
    step = sorted(r["step_time_s"] for r in rows)[len(rows) // 2]
    data = sorted(r["data_s_per_step"] for r in rows)[len(rows) // 2]
    return {"step_s": step, "data_s": data, "model_s": step - data, "frozen_encoder_flops": rows[-1].get(
        "frozen_flops_per_step", 0.0), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def cell(entry: dict) -> str:
    return f"{entry['successes']}/{entry['episodes']} ({entry['success_rate']:.0%})"


def print_table(results: dict[str, dict], tasks: Sequence[str], title: str) -> None:
    print(f"\n{title}")
    header = ["task", *results]
    lines = [[task, *(cell(results[row]["tasks"][task]) for row in results)] for task in tasks]
    lines.append(["overall", *(cell(results[row]["overall"]) for row in results)])
    widths = [max(len(r[i]) for r in (header, *lines)) for i in range(len(header))]
    for line in (header, ["-" * w for w in widths], *lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: Sequence[str]) -> None:
    del argv
    unknown = [r for r in FLAGS.rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"--rows {unknown}; known: {list(ROWS)}")
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="wam_perception_")
    data_dir, cache, run_dir = (os.path.join(workdir, d) for d in ("data", "latents", "run"))
    timings: dict[str, float] = {}
    stats_path = collect(data_dir, FLAGS.tasks, FLAGS.episodes, timings)
    overrides = lab_overrides(data_dir, stats_path)
    encode(cache, overrides, FLAGS.num_batches, timings)
    train(run_dir, [*overrides, f"--config.data.latents_cache={cache}", f"--config.train.steps={FLAGS.steps}",
                    f"--config.train.seed={FLAGS.seed}", f"--config.data.seed={FLAGS.seed}",
                    f"--config.checkpoint.every_steps={FLAGS.steps}"], timings)
    results, eval_seconds = {}, {}
    for row in FLAGS.rows:
        results[row], eval_seconds[row] = closed_loop(
            row_args(row, os.path.join(run_dir, "checkpoints"), FLAGS.num_steps),
            os.path.join(workdir, f"eval_{row}"), row, FLAGS.tasks, FLAGS.eval_episodes, FLAGS.max_steps)
    breakdown = step_breakdown(run_dir)
    print_table(results, FLAGS.tasks,
                f"Meta-World closed loop, lab WAM ({FLAGS.steps} action-tuning steps on {FLAGS.episodes} expert "
                f"episodes per task, both cameras at 64x64); {FLAGS.eval_episodes} held-out variants per task "
                f"(MT1 seed 1000), at most {FLAGS.max_steps} steps, {FLAGS.num_steps} denoising steps")
    if breakdown:
        print(f"training step: {breakdown['step_s'] * 1e3:.0f} ms median, of which waiting for data "
              f"{breakdown['data_s'] * 1e3:.1f} ms ({breakdown['data_s'] / breakdown['step_s']:.1%}); "
              f"frozen encoder FLOPs per step {breakdown['frozen_encoder_flops']:.3g}; loss "
              f"{breakdown['loss_first']:.3f} -> {breakdown['loss_last']:.3f}")
    print("wall clock: " + ", ".join(f"{k} {v:.0f} s" for k, v in {**timings, **{
        f"eval {k}": v for k, v in eval_seconds.items()}}.items()))
    out = {
        "tasks": {task: {row: {k: results[row]["tasks"][task][k] for k in ("episodes", "successes", "success_rate")}
                         for row in results} for task in FLAGS.tasks},
        "overall": {row: {k: results[row]["overall"][k] for k in ("episodes", "successes", "success_rate")}
                    for row in results},
        "config": {"tasks": list(FLAGS.tasks), "episodes": FLAGS.episodes, "steps": FLAGS.steps,
                   "eval_episodes": FLAGS.eval_episodes, "max_steps": FLAGS.max_steps, "seed": FLAGS.seed,
                   "num_steps": FLAGS.num_steps},
        "step": breakdown,
        "wall_clock_s": {**timings, **{f"eval_{k}": v for k, v in eval_seconds.items()}},
    }
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
            json.dump(out, f, indent=1)
        for row in results:  # the episode videos of every row, beside the table
            source = os.path.join(workdir, f"eval_{row}")
            if os.path.abspath(source) != os.path.abspath(os.path.join(FLAGS.out, row)):
                shutil.copytree(source, os.path.join(FLAGS.out, row), dirs_exist_ok=True)
        print(f"wrote {os.path.join(FLAGS.out, 'results.json')}")


def define_data_flags() -> None:
    """The flags of the collect and encode phases (shared by the benchmarks built on these phases)."""
    flags.DEFINE_list("tasks", ["button-press-topdown-v3", "reach-v3", "push-v3"], "Meta-World tasks.")
    flags.DEFINE_integer("episodes", 30, "Expert episodes collected per task (training variants, MT1 seed 0).")
    flags.DEFINE_integer("num_batches", 500, "Batches of the lab config's batch size encoded into the cache.")


if __name__ == "__main__":
    define_data_flags()
    flags.DEFINE_integer("steps", 3000, "Action-tuning steps.")
    flags.DEFINE_integer("seed", 0, "Training seed (parameters and data order).")
    flags.DEFINE_integer("eval_episodes", 20, "Held-out variants per task and row.")
    flags.DEFINE_integer("max_steps", 200, "Environment steps per evaluation episode.")
    flags.DEFINE_integer("num_steps", 4, "Denoising steps of the trained policy.")
    flags.DEFINE_list("rows", list(ROWS), "Rows to evaluate.")
    flags.DEFINE_string("workdir", "", "Where data, cache, run and evaluations go (default: a new temp dir); "
                        "phases already there are reused.")
    flags.DEFINE_string("out", "", "Directory for results.json and the rows' episode videos.")
    app.run(main)
