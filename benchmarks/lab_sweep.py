"""How wide and deep must the lab model be to look? A short training sweep on the perception benchmark's cache.

    python benchmarks/lab_sweep.py --workdir=DIR [--shapes=1x64x4,2x64x4,2x64x6,3x64x4] [--steps=600]

DIR is a `benchmarks/closed_loop.py` workdir (its `data/` and `latents/` are reused). Each shape is
HEADSxHEAD_DIMxLAYERS (ffn 4x the width) of the lab config, trained `--steps` action-tuning steps from the cache;
the table gives parameters, the median step time, the last logged action loss, and the vision ablation on the
training episodes (`wamjax.eval.offline --vision_ablation`): the first chunk's error with the cameras, with a black
frame, and for a constant mean action. A model that looks has camera error well below blank error.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import closed_loop as bench  # noqa: E402

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    del argv
    data_dir, cache = os.path.join(FLAGS.workdir, "data"), os.path.join(FLAGS.workdir, "latents")
    stats_path = os.path.join(data_dir, "stats.json")
    rows = []
    for shape in FLAGS.shapes:
        heads, head_dim, layers = (int(v) for v in shape.split("x"))
        width = heads * head_dim
        run_dir = os.path.join(FLAGS.workdir, f"sweep_{shape}")
        bench.train(run_dir, [*bench.lab_overrides(data_dir, stats_path), f"--config.data.latents_cache={cache}",
                              f"--config.train.steps={FLAGS.steps}", f"--config.model.num_attention_heads={heads}",
                              f"--config.model.attention_head_dim={head_dim}", f"--config.model.num_layers={layers}",
                              f"--config.model.ffn_dim={4 * width}", f"--config.checkpoint.every_steps={FLAGS.steps}"],
                    {}, f"train {shape}")
        out = os.path.join(run_dir, "ablation")
        if not os.path.exists(os.path.join(out, "vision_ablation.json")):
            bench.run(["-m", "wamjax.eval.offline", f"--checkpoint={run_dir}/checkpoints", "--vision_ablation",
                       f"--ablation_episodes={FLAGS.ablation_episodes}", "--ablation_windows=2", f"--out={out}"],
                      f"ablation {shape}")
        with open(os.path.join(out, "vision_ablation.json")) as f:
            mae = json.load(f)["datasets"][0]["mae"]
        breakdown = bench.step_breakdown(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f if '"loss_action"' in line][-1]
        rows.append([shape, str(width), str(layers), f"{breakdown.get('step_s', float('nan')) * 1e3:.0f}",
                     f"{last['loss_action']:.4f}", f"{mae['camera']:.4f}", f"{mae['blank']:.4f}",
                     f"{mae['mean_action']:.4f}"])
    header = ["shape", "width", "layers", "ms/step", "action loss", "MAE camera", "MAE blank", "MAE mean"]
    print(f"\nlab sweep: {FLAGS.steps} steps each on {cache}")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for line in (header, ["-" * w for w in widths], *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A benchmarks/closed_loop.py workdir (data/ and latents/ are reused).")
    flags.DEFINE_list("shapes", ["1x64x4", "2x64x2", "2x64x4", "3x64x4"], "HEADSxHEAD_DIMxLAYERS to train.")
    flags.DEFINE_integer("steps", 600, "Action-tuning steps per shape.")
    flags.DEFINE_integer("ablation_episodes", 12, "Episodes of the vision ablation.")
    flags.mark_flag_as_required("workdir")
    app.run(main)
