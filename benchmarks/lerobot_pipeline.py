"""Throughput of the LeRobot source (H.264 and AV1 mp4s) beside the RLDS source (JPEG) over the same episodes.

    python -m benchmarks.lerobot_pipeline [--episodes=6] [--batches=12] [--workers=0,2] [--source_size=224,224]

Writes the same procedural episodes (one camera at `source_size`) as a LeRobot v3.0 dataset per codec and as an
OXE-format RLDS dataset (bridge's JPEG encoding), then prints clips/s and MB/s of decoded frames for each source,
output resolution (32x32 and 224x224) and Grain worker count, in batches of 8 clips of 9 frames.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

from absl import app, flags

from benchmarks.data_pipeline import throughput
from data_pipelines import config as config_lib
from data_pipelines import make_lerobot, make_oxe_like
from data_pipelines.standardize import stats as stats_lib

FLAGS = flags.FLAGS


def _config(data_dir: str, dataset: str, stats_path: str, resolution: tuple[int, int], workers: int):
    config = config_lib.get_data_config()
    config.update(data_dir=data_dir, stats_path=stats_path, datasets=dataset, resolution=resolution, batch_size=8,
                  worker_count=workers, num_frames=9)
    return config


def main(argv: Sequence[str]) -> None:
    del argv
    size = tuple(int(v) for v in FLAGS.source_size)
    workdir = tempfile.mkdtemp(prefix="lerobot_bench_")
    try:
        episodes = make_lerobot.synthetic_episodes(FLAGS.episodes, seed=0, image_size=size, min_steps=40,
                                                   max_steps=60)
        for episode in episodes:  # one camera, as the RLDS bridge dataset has
            episode["images"] = {make_lerobot.CAMERAS[0]: episode["images"][make_lerobot.CAMERAS[0]]}
        datasets = []
        for codec in ("h264", "av1"):
            make_lerobot.write_dataset(os.path.join(workdir, f"lerobot_{codec}"), episodes, codec=codec,
                                       episodes_per_file=FLAGS.episodes)
            datasets.append((f"LeRobot v3.0, {codec}", f"lerobot:lerobot_{codec}"))
        make_oxe_like.make_datasets(workdir, ["bridge"], episodes=FLAGS.episodes, seed=0, image_size=size,
                                    min_steps=40, max_steps=60)
        datasets.append(("RLDS (bridge), JPEG", "bridge"))
        stats_path = os.path.join(workdir, "stats.json")
        stats_lib.save_stats(stats_lib.compute_stats(workdir, [d for _, d in datasets]), stats_path)
        print(f"source frames {size[0]}x{size[1]}, {FLAGS.episodes} episodes of 40-60 steps, one camera; "
              f"batches of 8 clips of 9 frames\n")
        print("| source | output | workers | clips/s | MB/s decoded |")
        print("|---|---|---|---|---|")
        for label, dataset in datasets:
            for resolution in ((32, 32), size):
                for workers in (int(w) for w in FLAGS.workers):
                    config = _config(workdir, dataset, stats_path, resolution, workers)
                    clips, mbps = throughput(config, FLAGS.batches)
                    print(f"| {label} | {resolution[0]}x{resolution[1]} | {workers} | {clips:.1f} | {mbps:.1f} |",
                          flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    flags.DEFINE_integer("episodes", 6, "Episodes per dataset.")
    flags.DEFINE_integer("batches", 12, "Timed batches per configuration.")
    flags.DEFINE_list("workers", ["0", "2"], "Grain worker counts to measure (0: in-process).")
    flags.DEFINE_list("source_size", ["224", "224"], "H,W of the stored frames.")
    app.run(main)
