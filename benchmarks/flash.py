"""DreamZero-Flash on the CPU lab model: closed-loop success and chunk latency at 16, 4 and 1 action steps, for a
Flash-trained and a standard-trained checkpoint of the same data and steps.

    python benchmarks/flash.py [--workdir=DIR] [--out=DIR] [--steps=3000] [--eval_episodes=10] \
        [--action_steps=16,4,1] [--tasks=...]

Phases (each reused when its folder is in --workdir, so the perception benchmark's workdir can be passed and
its `run/` is the standard-trained model):
  collect, stats, encode   as `benchmarks/closed_loop.py` (expert episodes, both cameras at 64x64, the lab cache);
  train                    `configs/lab.py` (run/) and `configs/lab.py:flash=1` (run_flash/: video t ~ Beta(7,1),
                           actions uniform and independent), same seed, data and steps;
  evaluate                 `wamjax.eval.closed_loop` on held-out variants (MT1 seed 1000), 16 video steps and
                           K action steps; at K=1 the video stops at t=0.65 (the Flash schedule) for both models;
  latency                  the median `Policy.infer` of each setting after its compile (random frames).
Prints one table (model, action steps, success per task, overall, ms per chunk); `--out=DIR` writes
`DIR/results.json` with the same rows.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the policy is timed in-process
import closed_loop as bench  # noqa: E402  (the perception benchmark's phases)

FLAGS = flags.FLAGS
MODELS = {"standard": ("run", ""), "flash": ("run_flash", ":flash=1")}  # run folder, configs/lab.py argument
FLASH_VIDEO_STOP_T = 0.65  # configs/lab.py's: where Beta(7, 1) puts 5% of its draws


def sampler_knobs(action_steps: int) -> dict:
    """The Policy / closed-loop sampler settings of one row."""
    knobs = {"num_steps": 16, "action_steps": action_steps}
    if action_steps == 1:
        knobs["video_stop_t"] = FLASH_VIDEO_STOP_T
    return knobs


def chunk_latency_ms(checkpoint: str, knobs: dict, repeats: int) -> float:
    """Median milliseconds of one `Policy.infer` under `knobs`, after the compiling first call."""
    import numpy as np

    from wamjax.eval.agents import stats_dataset
    from wamjax.inference.policy import Policy

    policy = Policy.from_checkpoint(checkpoint, dataset=stats_dataset(checkpoint, "metaworld"), **knobs)
    rng = np.random.default_rng(0)
    h, w = policy.resolution
    frames = [rng.integers(0, 255, (h, w, 3), np.uint8) for _ in range(max(policy.num_cameras, 1))]
    frames = frames if len(frames) > 1 else frames[0]
    proprio = np.zeros(policy.proprio_dim, np.float32)
    policy.infer(frames, proprio, "press the button")  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        policy.infer(frames, proprio, "press the button")
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: Sequence[str]) -> None:
    del argv
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="wam_flash_")
    data_dir, cache = os.path.join(workdir, "data"), os.path.join(workdir, "latents")
    timings: dict[str, float] = {}
    stats_path = bench.collect(data_dir, FLAGS.tasks, FLAGS.episodes, timings)
    bench.encode(cache, bench.lab_overrides(data_dir, stats_path), FLAGS.num_batches, timings)
    rows = []
    for model, (folder, arg) in MODELS.items():
        run_dir = os.path.join(workdir, folder)
        overrides = [f"--config={bench.LAB}{arg}", f"--config.data.data_dir={data_dir}",
                     f"--config.data.stats_path={stats_path}", f"--config.data.latents_cache={cache}",
                     f"--config.train.steps={FLAGS.steps}", f"--config.train.seed={FLAGS.seed}",
                     f"--config.data.seed={FLAGS.seed}", f"--config.checkpoint.every_steps={FLAGS.steps}"]
        bench.train(run_dir, overrides, timings, f"train {model}")
        checkpoint = os.path.join(run_dir, "checkpoints")
        for k in (int(s) for s in FLAGS.action_steps):
            knobs = sampler_knobs(k)
            name = f"{model}_a{k}"
            summary, seconds = bench.closed_loop(
                [f"--checkpoint={checkpoint}", "--mode=joint", *(f"--{key}={value}" for key, value in knobs.items())],
                os.path.join(workdir, f"eval_{name}"), f"eval {name}", FLAGS.tasks, FLAGS.eval_episodes,
                FLAGS.max_steps)
            timings[f"eval {name}"] = seconds
            rows.append({"model": model, "action_steps": k, **knobs,
                         "ms_per_chunk": chunk_latency_ms(checkpoint, knobs, FLAGS.repeats),
                         "tasks": {t: {key: summary["tasks"][t][key] for key in ("episodes", "successes",
                                                                                  "success_rate")}
                                   for t in FLAGS.tasks},
                         "overall": {key: summary["overall"][key] for key in ("episodes", "successes",
                                                                               "success_rate")}})

    print(f"\nDreamZero-Flash on the lab model: {FLAGS.steps} action-tuning steps each, 16 video steps, "
          f"{FLAGS.eval_episodes} held-out variants per task (MT1 seed 1000), at most {FLAGS.max_steps} steps")
    cell = lambda e: f"{e['successes']}/{e['episodes']}"
    header = ["trained", "action steps", *FLAGS.tasks, "overall", "ms / chunk"]
    lines = [[r["model"], str(r["action_steps"]) + (" (video stops at 0.65)" if "video_stop_t" in r else ""),
              *(cell(r["tasks"][t]) for t in FLAGS.tasks), cell(r["overall"]), f"{r['ms_per_chunk']:.1f}"]
             for r in rows]
    widths = [max(len(x[i]) for x in (header, *lines)) for i in range(len(header))]
    for line in (header, ["-" * w for w in widths], *lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print("wall clock: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
            json.dump({"rows": rows, "wall_clock_s": timings,
                       "config": {"tasks": list(FLAGS.tasks), "steps": FLAGS.steps, "seed": FLAGS.seed,
                                  "eval_episodes": FLAGS.eval_episodes, "max_steps": FLAGS.max_steps}}, f, indent=1)
        print(f"wrote {os.path.join(FLAGS.out, 'results.json')}")


if __name__ == "__main__":
    bench.define_data_flags()
    flags.DEFINE_integer("steps", 3000, "Action-tuning steps of each model.")
    flags.DEFINE_integer("seed", 0, "Training seed of both models.")
    flags.DEFINE_list("action_steps", ["16", "4", "1"], "Action denoising steps of the rows (16 video steps).")
    flags.DEFINE_integer("eval_episodes", 10, "Held-out variants per task and row.")
    flags.DEFINE_integer("max_steps", 200, "Environment steps per evaluation episode.")
    flags.DEFINE_integer("repeats", 10, "Timed Policy.infer calls per row.")
    flags.DEFINE_string("workdir", "", "Where data, cache, runs and evaluations go (default: a new temp dir); "
                        "existing phases are reused.")
    flags.DEFINE_string("out", "", "Directory for results.json.")
    app.run(main)
