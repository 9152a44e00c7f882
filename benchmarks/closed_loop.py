"""Does a world-action model trained here act? Closed-loop success in Meta-World beside the expert and random.

    python benchmarks/closed_loop.py [--tasks=drawer-close-v3] [--episodes=30] [--pretrain_steps=150] \
        [--tune_steps=300] [--eval_episodes=10] [--max_steps=150] [--execute_actions=4] \
        [--modes=joint,imagine_then_act] [--workdir=DIR]

Collects scripted-expert episodes of each task (MT1 seed 0), trains the `tiny` WAM on CPU on them (video
pretraining, then action tuning from that checkpoint, `stage=all`), and runs the trained policy (once per
mode), the scripted expert, a uniformly random policy and a blind replay of one expert episode's actions
(`--policy=replay`: what a task needs no perception for) on held-out variants (MT1 seed 1000) through
`wamjax.eval.closed_loop`, all with the same success criterion and step cap. Prints one row per task: success
rate and mean steps to success of each. Every step is a subprocess of the repository's own CLIs, so the
figures are what a user would get.

The default task is one whose target the 32x32 model input shows (the drawer: reach-v3's goal is a one-pixel
dot at that size), and the policy replans after half of each 8-action chunk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def _run(args: list[str], label: str) -> float:
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


def _closed_loop(policy_args: list[str], out: str, label: str) -> tuple[dict, float]:
    seconds = _run(["-m", "wamjax.eval.closed_loop", f"--tasks={','.join(FLAGS.tasks)}",
                    f"--episodes={FLAGS.eval_episodes}", f"--max_steps={FLAGS.max_steps}",
                    f"--resolution={FLAGS.resolution}", f"--out={out}", *policy_args], label)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), seconds


def _cell(entry: dict) -> str:
    steps = entry["mean_steps_to_success"]
    rate = f"{entry['successes']}/{entry['episodes']} ({entry['success_rate']:.0%})"
    return rate if steps is None else f"{rate}, {steps:.0f} steps"


def main(argv: Sequence[str]) -> None:
    del argv
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="wam_closed_loop_")
    data_dir, run_dir = os.path.join(workdir, "data"), os.path.join(workdir, "run")
    timings = {}
    if not os.path.exists(os.path.join(data_dir, "metaworld")):
        timings["collect"] = _run(["-m", "data_pipelines.collect_sim", "--env=metaworld",
                                   f"--tasks={','.join(FLAGS.tasks)}", f"--episodes={FLAGS.episodes}",
                                   f"--resolution={FLAGS.resolution}", f"--out={data_dir}"], "collect")
    stats_path = os.path.join(data_dir, "stats.json")
    if not os.path.exists(stats_path):
        _run(["-m", "data_pipelines.compute_stats", f"--data_dir={data_dir}", "--datasets=metaworld",
              f"--out={stats_path}"], "stats")
    if FLAGS.reuse_run and os.path.exists(os.path.join(run_dir, "checkpoints")):
        print(f"[train] reusing the trained run in {run_dir}", flush=True)
    else:
        timings["train"] = _train(data_dir, run_dir, stats_path)
    _evaluate_and_print(workdir, run_dir, timings)


def _train(data_dir: str, run_dir: str, stats_path: str) -> float:
    return _run([
        "-m", "wamjax.main", f"--config={os.path.join(REPO, 'configs', 'wam.py')}:size=tiny,stage=all,data=oxe",
        f"--workdir={run_dir}", f"--config.data.data_dir={data_dir}", "--config.data.datasets=metaworld",
        f"--config.data.stats_path={stats_path}", f"--config.data.frame_stride={FLAGS.frame_stride}",
        f"--config.stages.video_pretrain.steps={FLAGS.pretrain_steps}",
        f"--config.stages.action_tune.steps={FLAGS.tune_steps}",
        f"--config.train.steps={FLAGS.pretrain_steps + FLAGS.tune_steps}",
        "--config.checkpoint.every_steps=100000",
    ], "train")


def _evaluate_and_print(workdir: str, run_dir: str, timings: dict[str, float]) -> None:
    results = {
        "expert": _closed_loop(["--policy=expert"], os.path.join(workdir, "eval_expert"), "expert"),
        "random": _closed_loop(["--policy=random"], os.path.join(workdir, "eval_random"), "random"),
        "replay": _closed_loop(["--policy=replay"], os.path.join(workdir, "eval_replay"), "replay"),
    }
    execute = [f"--execute_actions={FLAGS.execute_actions}"] if FLAGS.execute_actions else []
    for mode in FLAGS.modes:
        results[f"wam ({mode})"] = _closed_loop(
            [f"--checkpoint={run_dir}/checkpoints", f"--num_steps={FLAGS.num_steps}", f"--mode={mode}", *execute],
            os.path.join(workdir, f"eval_wam_{mode}"), f"wam ({mode})")
    losses = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for stage in ("video_pretrain", "action_tune"):
        stage_rows = [r for r in rows if r.get("stage") == stage and "loss" in r]
        if stage_rows:
            losses.append(f"{stage} loss {stage_rows[0]['loss']:.3f} -> {stage_rows[-1]['loss']:.3f}")

    print()
    print(f"Meta-World closed loop: tiny WAM trained on {FLAGS.episodes} expert episodes per task "
          f"({FLAGS.pretrain_steps} video + {FLAGS.tune_steps} action steps, frame_stride {FLAGS.frame_stride}, "
          f"{FLAGS.resolution} renders, 32x32 model input); {FLAGS.eval_episodes} held-out variants per task, "
          f"at most {FLAGS.max_steps} steps, {FLAGS.num_steps} denoising steps, "
          f"{FLAGS.execute_actions or 'all'} actions of each chunk executed before replanning; {'; '.join(losses)}")
    header = ["task", *results]
    rows_out = [[task, *(_cell(results[name][0]["tasks"][task]) for name in results)] for task in FLAGS.tasks]
    widths = [max(len(r[i]) for r in (header, *rows_out)) for i in range(len(header))]
    for row in (header, ["-" * w for w in widths], *rows_out):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    timing_text = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    eval_text = ", ".join(f"{name} {results[name][1]:.0f} s" for name in results)
    print(f"wall time: {timing_text}; closed-loop eval: {eval_text}; workdir {workdir}")


if __name__ == "__main__":
    flags.DEFINE_list("tasks", ["drawer-close-v3"], "Meta-World tasks.")
    flags.DEFINE_integer("episodes", 30, "Expert episodes collected per task.")
    flags.DEFINE_string("resolution", "64,64", "H,W of the rendered cameras (the model trains at 32x32).")
    flags.DEFINE_integer("frame_stride", 2, "Environment steps between clip frames (and per predicted action).")
    flags.DEFINE_integer("pretrain_steps", 150, "Video pretraining steps.")
    flags.DEFINE_integer("tune_steps", 300, "Action tuning steps.")
    flags.DEFINE_integer("eval_episodes", 10, "Held-out episodes per task and policy.")
    flags.DEFINE_integer("max_steps", 150, "Environment steps per evaluation episode.")
    flags.DEFINE_integer("num_steps", 4, "Denoising steps of the trained policy.")
    flags.DEFINE_integer("execute_actions", 4, "Actions of each predicted chunk run before replanning (0: all).")
    flags.DEFINE_list("modes", ["joint"], "Ways the trained model acts (joint, imagine_then_act), one evaluation each.")
    flags.DEFINE_bool("reuse_run", False, "Evaluate the trained run already in --workdir instead of training.")
    flags.DEFINE_string("workdir", "", "Where data, run and evaluations go (default: a new temp dir); "
                        "existing data there is reused.")
    app.run(main)
