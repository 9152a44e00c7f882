"""Video ingest and video-shard loading throughput on generated videos.

    python -m benchmarks.video_ingest [--num_videos=8 --frames_per_video=120 --video_size=240,320]

Prints three tables:
  1. decode only: PyAV frames decoded per second in one process (the ceiling for ingest);
  2. ingest with 1 and 2 workers: source frames decoded (+ resized, JPEG-encoded, written) per second,
     in total and per worker, also excluding the worker processes' start-up (spawn + imports);
  3. loading from the shards: seconds to produce one batch of clips in-process (read, JPEG decode,
     contract dict, stack), and, given --step_time_s (a measured train step), the share of a step
     spent waiting for data when loading is synchronous (no Grain worker processes).

A step time for --step_time_s: the median `step_time_s` in DIR/metrics.jsonl after
    python -m wamjax.main --config=configs/wam.py:size=tiny,stage=video_pretrain --workdir=DIR \
        --config.train.steps=12
with --resolution and --num_frames here set to that config's data.resolution and data.num_frames.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import av
import numpy as np
from absl import app, flags

from data_pipelines.sources import video as video_source
from wamjax.jobs import ingest_video

if TYPE_CHECKING:
    import grain


def make_videos(directory: str, num_videos: int, num_frames: int, size: tuple[int, int]) -> str:
    """Writes H.264 videos of moving gradients plus noise (so they decode like camera footage)."""
    height, width = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    # A small pool of noise frames: drawing fresh noise per frame would dominate the set-up time.
    noise_pool = rng.integers(0, 24, size=(7, height, width, 3))
    captions = {}
    for v in range(num_videos):
        name = f"video_{v:03d}.mp4"
        with av.open(os.path.join(directory, name), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(num_frames):
                base = np.stack([(xx + 3 * i + 40 * v) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], -1)
                image = np.clip(base + noise_pool[(i + v) % len(noise_pool)], 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        captions[name] = f"generated video {v}"
    captions_path = os.path.join(directory, "captions.jsonl")
    with open(captions_path, "w", encoding="utf-8") as f:
        for name, caption in captions.items():
            f.write(json.dumps({"video": name, "caption": caption}) + "\n")
    return captions_path


def decode_only_fps(paths: Sequence[str]) -> float:
    """Frames per second of bare PyAV decoding (no conversion), one process."""
    frames = 0
    start = time.perf_counter()
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames += sum(1 for _ in container.decode(stream))
    return frames / (time.perf_counter() - start)


def _define_flags() -> None:
    # Defined only when run as a program: data_pipelines modules define flags of the same names.
    flags.DEFINE_integer("num_videos", 8, "Generated videos.")
    flags.DEFINE_integer("frames_per_video", 300, "Frames per generated video (30 fps).")
    flags.DEFINE_list("video_size", ["240", "320"], "Generated video size H,W.")
    flags.DEFINE_list("resolution", ["128", "128"], "Clip frame size H,W.")
    flags.DEFINE_integer("num_frames", 9, "Frames per clip.")
    flags.DEFINE_float("fps", 0.0, "Clip sampling fps; 0 keeps every frame, so every frame is encoded.")
    flags.DEFINE_list("workers", ["1", "2"], "Worker counts to time.")
    flags.DEFINE_integer("batch_size", 8, "Clips per batch when timing the loader.")
    flags.DEFINE_integer("batches", 50, "Batches timed.")
    flags.DEFINE_float(
        "step_time_s", 0.0,
        "Measured seconds per train step (e.g. from `python -m wamjax.main` logs); 0: batch time only.",
    )


def _import_ingest(_: int) -> None:
    import wamjax.jobs.ingest_shards  # noqa: F401  (what a spawned ingest worker imports)


def worker_startup_s(workers: int) -> float:
    """Seconds to spawn `workers` processes that import the ingest module, as ingest's pool does."""
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_import_ingest, range(workers), chunksize=1)
    return time.perf_counter() - start


def main(argv: Sequence[str]) -> None:
    del argv
    FLAGS = flags.FLAGS
    size = (int(FLAGS.video_size[0]), int(FLAGS.video_size[1]))
    resolution = (int(FLAGS.resolution[0]), int(FLAGS.resolution[1]))
    with tempfile.TemporaryDirectory() as root:
        videos_dir = os.path.join(root, "videos")
        os.makedirs(videos_dir)
        captions = make_videos(videos_dir, FLAGS.num_videos, FLAGS.frames_per_video, size)
        paths = sorted(glob.glob(os.path.join(videos_dir, "*.mp4")))
        total_frames = FLAGS.num_videos * FLAGS.frames_per_video
        print(f"{FLAGS.num_videos} H.264 videos of {FLAGS.frames_per_video} frames at {size[0]}x{size[1]}, "
              f"{os.cpu_count()} CPUs")
        print(f"\ndecode only (1 process): {decode_only_fps(paths):.0f} frames/s")

        print(f"\ningest -> {resolution[0]}x{resolution[1]} JPEG clips of {FLAGS.num_frames} frames "
              f"(fps={FLAGS.fps:g}), {FLAGS.num_videos} shards")
        print(f"{'workers':>8} {'wall s':>8} {'start-up s':>11} {'frames/s':>10} {'frames/s/worker':>16} "
              f"{'excl. start-up':>15} {'clips':>7}")
        shard_dir = None
        for workers in (int(w) for w in FLAGS.workers):
            out = os.path.join(root, f"shards_{workers}")
            start = time.perf_counter()
            # Worker start-up (spawn, imports) is part of the wall time, as it is for a real run.
            report = ingest_video.ingest(
                paths, captions, out, num_frames=FLAGS.num_frames, fps=FLAGS.fps, resolution=resolution,
                num_shards=FLAGS.num_videos, workers=workers, show_progress=False,
            )
            wall = time.perf_counter() - start
            startup = worker_startup_s(workers) if workers > 1 else 0.0
            busy = max(wall - startup, 1e-9)
            print(f"{workers:>8} {wall:>8.2f} {startup:>11.2f} {total_frames / wall:>10.0f} "
                  f"{total_frames / wall / workers:>16.0f} {total_frames / busy / workers:>15.0f} "
                  f"{report['clips']:>7}")
            shard_dir = out

        # Imported only now: spawned ingest workers re-import this module, and grain pulls in JAX.
        import grain

        dataset = video_source.make_video_dataset(
            shard_dir, num_frames=FLAGS.num_frames, resolution=resolution, seed=0, num_epochs=None
        )
        sync_s = time_batches(dataset, grain.ReadOptions(num_threads=0, prefetch_buffer_size=0), FLAGS)
        threaded_s = time_batches(dataset, grain.ReadOptions(), FLAGS)
        frames = FLAGS.batch_size * FLAGS.num_frames
        print(f"\nloading batches of {FLAGS.batch_size} clips from the shards, in the training process:")
        print(f"  synchronous (no read threads): {sync_s * 1e3:7.1f} ms/batch ({frames / sync_s:6.0f} frames/s)")
        print(f"  Grain read threads (default):  {threaded_s * 1e3:7.1f} ms/batch ({frames / threaded_s:6.0f} "
              "frames/s)")
        if FLAGS.step_time_s > 0:
            share = sync_s / (sync_s + FLAGS.step_time_s)
            print(f"with a {FLAGS.step_time_s:.3f} s train step: {100 * share:.1f}% of each step waits for data "
                  "when loading synchronously")
        else:
            print("no --step_time_s given: the data-wait share of a train step is not computed")


def time_batches(dataset: grain.MapDataset, read_options: grain.ReadOptions, FLAGS: flags.FlagValues) -> float:
    """Seconds per batch over FLAGS.batches batches, the first (opening shards, filling buffers) excluded."""
    iterator = iter(dataset.to_iter_dataset(read_options).batch(FLAGS.batch_size))
    next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)
    return (time.perf_counter() - start) / FLAGS.batches


if __name__ == "__main__":
    _define_flags()
    app.run(main)
