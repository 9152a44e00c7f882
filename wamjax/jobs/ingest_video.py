"""Ingest captioned video files into ArrayRecord clip shards for video pretraining: the job and its CLI.

    python -m wamjax.jobs.ingest_video --videos='raw/**/*.mp4' --captions=raw/captions.jsonl \
        --out=shards/ --num_frames=9 --fps=8 --resolution=256,256 --num_shards=64 --workers=8

The job plans the files (`ingest_plan`: captions, shard assignment), writes the shards not yet complete
in parallel worker processes (`ingest_shards`, decoding each video with `ingest_decode`), and writes
`OUT/ingest_report.json` (`ingest_report`): counts, clips per shard, and every file that could not be
used (undecodable, truncated, empty, no caption, shorter than one clip) with its reason.

The same inputs and flags give byte-identical shards whatever the worker count. A re-run skips shards
already complete, so a killed ingest resumes; it refuses an output directory written with other options.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import av
from absl import app, flags, logging

from data_pipelines.sources import video as video_source
from wamjax.jobs.ingest_decode import IMAGE_FORMATS, ClipOptions
from wamjax.jobs.ingest_plan import assign_shards, plan_videos
from wamjax.jobs.ingest_report import REPORT_NAME, Progress, make_report
from wamjax.jobs.ingest_shards import (
    TMP_SUFFIX,
    init_worker,
    shard_complete,
    write_json_atomic,
    write_shard,
    write_shard_job,
)

CONFIG_NAME = "ingest_config.json"


def _check_resume_config(out_dir: str, config: dict[str, Any]) -> None:
    path = os.path.join(out_dir, CONFIG_NAME)
    if not os.path.exists(path):
        write_json_atomic(path, config)
        return
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    if previous != config:
        differing = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
        raise ValueError(
            f"{path} was written by an ingest with different {differing}; resuming would mix "
            "incompatible shards: use a new --out directory (or delete this one)"
        )


def ingest(
    videos: str | Sequence[str],
    captions_path: str,
    out_dir: str,
    *,
    num_frames: int = 9,
    fps: float = 8.0,
    resolution: tuple[int, int] = (256, 256),
    resize_mode: str = "crop",
    clip_stride_s: float | None = None,
    num_shards: int = 16,
    workers: int = 1,
    image_format: str = "jpeg",
    jpeg_quality: int = 90,
    video_root: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Ingests captioned videos into `out_dir` shards, resuming an earlier run; returns the report.

    `videos` is a glob (comma-separated globs allowed) or a list of paths/globs. The report (also
    written to `out_dir/ingest_report.json`) has counts, per-shard clip counts and every skipped file
    with its reason.
    """
    if num_frames < 1 or (num_frames - 1) % 4 != 0:
        raise ValueError(f"num_frames={num_frames}, expected 1 + 4k (Wan VAE's causal 4x time compression)")
    if len(resolution) != 2 or min(resolution) < 1:
        raise ValueError(f"resolution={resolution}, expected (H, W) with positive sizes")
    if resize_mode not in video_source.RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r}, expected one of {video_source.RESIZE_MODES}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r}, expected one of {IMAGE_FORMATS}")
    if num_shards < 1 or workers < 1:
        raise ValueError(f"num_shards={num_shards}, workers={workers}: both must be >= 1")
    if fps < 0 or (clip_stride_s is not None and clip_stride_s <= 0):
        raise ValueError(f"fps={fps} must be >= 0 (0: native) and clip_stride_s={clip_stride_s} > 0 or None")
    options = ClipOptions(
        num_frames,
        float(fps),
        (int(resolution[0]), int(resolution[1])),
        resize_mode,
        clip_stride_s,
        image_format,
        int(jpeg_quality),
    )

    files, no_caption = plan_videos(videos, captions_path, video_root)
    os.makedirs(out_dir, exist_ok=True)
    config = {
        "options": asdict(options) | {"resolution": list(options.resolution)},
        "num_shards": num_shards,
        "videos": [[v.source, v.caption, os.path.getsize(v.path)] for v in files],
    }
    _check_resume_config(out_dir, config)
    for name in os.listdir(out_dir):
        if name.startswith(".") and name.endswith(TMP_SUFFIX):
            os.remove(os.path.join(out_dir, name))  # Left by a killed run; never a finished shard.

    shards = assign_shards(files, num_shards)
    todo = [i for i in range(num_shards) if not shard_complete(out_dir, i, num_shards)]
    resumed = num_shards - len(todo)
    progress = Progress(sum(len(shards[i]) for i in todo), show_progress)
    logging.info(
        "ingest: %d videos (%d without caption) -> %d shards in %s; %d already complete",
        len(files),
        len(no_caption),
        num_shards,
        out_dir,
        resumed,
    )
    jobs = [(out_dir, i, num_shards, shards[i], options) for i in todo]
    start = time.monotonic()
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            write_shard(*job, progress=progress.update)
    else:
        _run_parallel(jobs, min(workers, len(jobs)), progress)
    elapsed = time.monotonic() - start
    progress.show(final=True)

    report = make_report(out_dir, num_shards, no_caption, options)
    write_json_atomic(os.path.join(out_dir, REPORT_NAME), report)
    new_frames = progress.counts["frames"]
    logging.info(
        "ingest: %d clips from %d videos in %d shards; %d skipped (see %s); "
        "this run: %d frames in %.1fs (%.0f frames/s)",
        report["clips"],
        report["videos_used"],
        num_shards,
        len(report["skipped"]),
        os.path.join(out_dir, REPORT_NAME),
        new_frames,
        elapsed,
        new_frames / max(elapsed, 1e-9),
    )
    return report


def _run_parallel(jobs: list[tuple], workers: int, progress: Progress) -> None:
    # Spawned (not forked) workers: the caller may hold threads (JAX, TF, Grain) that fork would copy.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    with context.Pool(workers, initializer=init_worker, initargs=(progress_queue,)) as pool:
        pending = pool.map_async(write_shard_job, jobs, chunksize=1)
        while True:
            try:
                progress.update(progress_queue.get(timeout=0.1))
            except queue.Empty:
                if pending.ready():
                    break
        pending.get()  # Re-raises a worker's exception here.
        while True:
            try:
                progress.update(progress_queue.get(timeout=0.1))
            except queue.Empty:
                break



# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------


def _define_flags() -> None:
    # Defined only when run as a program, so importing this module never clashes with a caller's flags.
    flags.DEFINE_string("videos", None, "Glob(s) of video files, comma-separated; ** recurses.")
    flags.DEFINE_string("captions", None, 'captions.jsonl: {"video": ..., "caption": ...} per line.')
    flags.DEFINE_string("out", None, "Output directory for shards and ingest_report.json.")
    flags.DEFINE_integer("num_frames", 9, "Frames per clip, 1 + 4k.")
    flags.DEFINE_float("fps", 8.0, "Sampling fps of the clips; 0 keeps every decoded frame.")
    flags.DEFINE_list("resolution", ["256", "256"], "Frame size H,W.")
    flags.DEFINE_enum(
        "resize_mode", "crop", list(video_source.RESIZE_MODES), "crop: cover and center-crop; pad: fit and black-pad."
    )
    flags.DEFINE_float("clip_stride_s", None, "Seconds between clip starts; default: clip length (no overlap).")
    flags.DEFINE_integer("num_shards", 16, "Number of output shards.")
    flags.DEFINE_integer("workers", 1, "Worker processes (each writes whole shards).")
    flags.DEFINE_enum("image_format", "jpeg", list(IMAGE_FORMATS), "Frame encoding.")
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality, 1-95.")
    flags.DEFINE_string("video_root", None, "Root that caption paths are relative to; default: the captions' dir.")
    flags.mark_flags_as_required(["videos", "captions", "out"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    if len(FLAGS.resolution) != 2:
        raise app.UsageError(f"--resolution={','.join(FLAGS.resolution)}, expected H,W")
    av.logging.set_level(av.logging.PANIC)
    report = ingest(
        FLAGS.videos,
        FLAGS.captions,
        FLAGS.out,
        num_frames=FLAGS.num_frames,
        fps=FLAGS.fps,
        resolution=(int(FLAGS.resolution[0]), int(FLAGS.resolution[1])),
        resize_mode=FLAGS.resize_mode,
        clip_stride_s=FLAGS.clip_stride_s,
        num_shards=FLAGS.num_shards,
        workers=FLAGS.workers,
        image_format=FLAGS.image_format,
        jpeg_quality=FLAGS.jpeg_quality,
        video_root=FLAGS.video_root,
    )
    print(
        f"videos: {report['videos_found']} found, {report['videos_used']} used, "
        f"{report['videos_skipped']} skipped; clips: {report['clips']}; shards: {report['num_shards']}"
    )
    for entry in report["skipped"]:
        print(f"  skipped {entry['path']}: {entry['reason']}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
