"""The seed's thesis on the CPU lab model: does pretraining to imagine make learning to act cheaper?

    python benchmarks/pretraining.py [--tasks=button-press-topdown-v3,reach-v3,push-v3] [--demos=5] \
        [--videos=30] [--other_tasks=drawer-close-v3,window-open-v3] [--pretrain_steps=1000] \
        [--tune_steps=1000] [--seeds=0,1] [--eval_episodes=10] [--workdir=DIR] [--out=DIR]

Few action-labelled demonstrations per task (`--demos`, training variants of MT1 seed 0) and many action-free
videos (`--videos` expert episodes per task of the same tasks and of `--other_tasks`, MT1 seed 1 variants, their
actions dropped). At equal action-tuning steps and demonstrations, three recipes of the lab config:
  scratch    action tuning from scratch on the demonstrations;
  pretrain   video pretraining on the action-free videos, then action tuning on the demonstrations;
  cotrain    the same pretraining, then action tuning on demonstrations and videos mixed 1:1 (the videos'
             action loss masked).
Each is trained with every seed of `--seeds` and evaluated closed loop (joint) on held-out variants (MT1 seed
1000). Prints success per task and the FLOPs each stage spent (from the run's ledger, model FLOPs), then per
recipe the mean and the spread (max - min) over seeds, and which differences from `scratch` exceed the larger
spread. `--out=DIR` writes `DIR/pretraining.json`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import closed_loop as bench  # noqa: E402  (the perception benchmark's phases)

FLAGS = flags.FLAGS
RECIPES = ("scratch", "pretrain", "cotrain")


def stage_flops(run_dir: str) -> dict[str, float]:
    """Model FLOPs each stage of a run spent, from its metrics (the ledger's running total)."""
    spent: dict[str, float] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if "stage_flops" in row and "stage" in row:
                spent[row["stage"]] = float(row["stage_flops"])
    return spent


def recipe_overrides(recipe: str, demos: str, videos: str, seed: int) -> list[str]:
    """The training flags of one recipe (beside the lab config on the demonstrations)."""
    common = [f"--config.train.seed={seed}", f"--config.data.seed={seed}", "--config.checkpoint.every_steps=100000",
              f"--config.stages.action_tune.steps={FLAGS.tune_steps}"]
    if recipe == "scratch":
        return [f"--config={bench.LAB}:stage=action_tune", *common, f"--config.data.latents_cache={demos}",
                f"--config.train.steps={FLAGS.tune_steps}"]
    tune_cache = demos if recipe == "pretrain" else f"{demos},{videos}"
    return [f"--config={bench.LAB}:stage=all", *common, f"--config.data.latents_cache={demos}",
            f"--config.stages.video_pretrain.latents_cache={videos}",
            f"--config.stages.video_pretrain.steps={FLAGS.pretrain_steps}",
            f"--config.stages.action_tune.latents_cache={tune_cache}",
            f"--config.train.steps={FLAGS.pretrain_steps + FLAGS.tune_steps}"]


def main(argv: Sequence[str]) -> None:
    del argv
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="wam_pretraining_")
    timings: dict[str, float] = {}
    demo_dir, video_dir = os.path.join(workdir, "demos"), os.path.join(workdir, "videos")
    stats_path = bench.collect(demo_dir, FLAGS.tasks, FLAGS.demos, timings)
    bench.collect(video_dir, [*FLAGS.tasks, *FLAGS.other_tasks], FLAGS.videos, timings, seed=1)
    demos, videos = os.path.join(workdir, "latents_demos"), os.path.join(workdir, "latents_videos")
    bench.encode(demos, bench.lab_overrides(demo_dir, stats_path), FLAGS.demo_batches, timings, "encode demos")
    # The videos are normalized with the demonstrations' stats, so the caches mix (their actions are dropped).
    bench.encode(videos, [*bench.lab_overrides(video_dir, stats_path), "--action_free"], FLAGS.video_batches,
                 timings, "encode videos")
    rows = []
    for seed in FLAGS.seeds:
        for recipe in RECIPES:
            name = f"{recipe}_seed{seed}"
            run_dir = os.path.join(workdir, name)
            overrides = recipe_overrides(recipe, demos, videos, int(seed))
            bench.train(run_dir, [*overrides, f"--config.data.data_dir={demo_dir}",
                                  f"--config.data.stats_path={stats_path}"], timings, f"train {name}")
            summary, seconds = bench.closed_loop(
                bench.row_args("wam_joint", os.path.join(run_dir, "checkpoints"), FLAGS.num_steps),
                os.path.join(workdir, f"eval_{name}"), f"eval {name}", FLAGS.tasks, FLAGS.eval_episodes,
                FLAGS.max_steps)
            timings[f"eval {name}"] = seconds
            rows.append({"recipe": recipe, "seed": int(seed), "flops": stage_flops(run_dir),
                         "tasks": {t: summary["tasks"][t]["success_rate"] for t in FLAGS.tasks},
                         "overall": summary["overall"]["success_rate"]})

    print(f"\nPretrained to imagine, tuned to act: {FLAGS.demos} demonstrations per task, {FLAGS.videos} action-free "
          f"videos per task of {len(FLAGS.tasks) + len(FLAGS.other_tasks)} tasks; {FLAGS.pretrain_steps} video "
          f"steps, {FLAGS.tune_steps} action steps; {FLAGS.eval_episodes} held-out variants per task")
    header = ["recipe", "seed", *FLAGS.tasks, "overall", "video FLOPs", "action FLOPs"]
    lines = [[r["recipe"], str(r["seed"]), *(f"{r['tasks'][t]:.0%}" for t in FLAGS.tasks), f"{r['overall']:.0%}",
              f"{r['flops'].get('video_pretrain', 0.0):.3g}", f"{r['flops'].get('action_tune', 0.0):.3g}"]
             for r in rows]
    widths = [max(len(x[i]) for x in (header, *lines)) for i in range(len(header))]
    for line in (header, ["-" * w for w in widths], *lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    summary = {}
    for recipe in RECIPES:
        values = [r["overall"] for r in rows if r["recipe"] == recipe]
        summary[recipe] = {"mean": sum(values) / len(values), "spread": max(values) - min(values)}
    print("\nper recipe, overall success over seeds: " + "; ".join(
        f"{k} {v['mean']:.0%} (spread {v['spread']:.0%})" for k, v in summary.items()))
    for recipe in ("pretrain", "cotrain"):
        diff = summary[recipe]["mean"] - summary["scratch"]["mean"]
        spread = max(summary[recipe]["spread"], summary["scratch"]["spread"])
        verdict = "exceeds" if abs(diff) > spread else "does not exceed"
        print(f"{recipe} - scratch: {diff:+.0%}, which {verdict} the seed spread ({spread:.0%})")
    print("wall clock: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "pretraining.json"), "w") as f:
            json.dump({"runs": rows, "summary": summary, "wall_clock_s": timings,
                       "config": {k: FLAGS[k].value for k in ("tasks", "demos", "videos", "other_tasks",
                                                              "pretrain_steps", "tune_steps", "seeds",
                                                              "eval_episodes", "max_steps")}}, f, indent=1)


if __name__ == "__main__":
    flags.DEFINE_list("tasks", ["button-press-topdown-v3", "reach-v3", "push-v3"], "Tasks to act on.")
    flags.DEFINE_integer("demos", 5, "Action-labelled expert episodes per task (MT1 seed 0 variants).")
    flags.DEFINE_integer("videos", 30, "Action-free expert episodes per task (MT1 seed 1 variants).")
    flags.DEFINE_list("other_tasks", ["drawer-close-v3", "window-open-v3"], "Tasks with videos but no demos.")
    flags.DEFINE_integer("demo_batches", 100, "Batches of the demonstrations encoded into their cache.")
    flags.DEFINE_integer("video_batches", 400, "Batches of the videos encoded into their cache.")
    flags.DEFINE_integer("pretrain_steps", 1000, "Video pretraining steps (pretrain, cotrain).")
    flags.DEFINE_integer("tune_steps", 1000, "Action-tuning steps (every recipe).")
    flags.DEFINE_list("seeds", ["0", "1"], "Training seeds.")
    flags.DEFINE_integer("eval_episodes", 10, "Held-out variants per task.")
    flags.DEFINE_integer("max_steps", 200, "Environment steps per evaluation episode.")
    flags.DEFINE_integer("num_steps", 4, "Denoising steps of the policy.")
    flags.DEFINE_string("workdir", "", "Where everything goes (default: a new temp dir); phases there are reused.")
    flags.DEFINE_string("out", "", "Directory for pretraining.json.")
    app.run(main)
