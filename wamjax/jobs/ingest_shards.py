"""Shard writing for video ingest: one shard at a time, atomically, with its summary beside it.

A shard is written under a temp name and renamed when complete (summary first, shard last), so a
reader never sees a partial shard and a re-run can skip the shards already complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import av
from absl import logging
from array_record.python import array_record_module

from data_pipelines.sources import shards
from data_pipelines.sources import video as video_source
from wamjax.jobs.ingest_decode import ClipOptions, SkipVideo, video_clips
from wamjax.jobs.ingest_plan import VideoFile

TMP_SUFFIX = ".tmp"


def summary_name(shard_index: int, num_shards: int) -> str:
    """File name of the JSON summary written beside shard `shard_index` of `num_shards`."""
    return video_source.shard_name(shard_index, num_shards).replace(video_source.SHARD_SUFFIX, ".json")


def _tmp_path(out_dir: str, name: str) -> str:
    # The leading dot and suffix keep temp files out of every reader's shard pattern.
    return os.path.join(out_dir, f".{name}{TMP_SUFFIX}")


def write_json_atomic(path: str, content: Any) -> None:
    """Writes `content` as JSON to `path` through a temp file, so readers see the old or the new file."""
    tmp = _tmp_path(os.path.dirname(path), os.path.basename(path))
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_complete(out_dir: str, shard_index: int, num_shards: int) -> bool:
    """Whether a shard and its summary were both finished by an earlier (or this) run, and the shard
    still opens with the clips its summary counts (a truncated copy is written again)."""
    shard = os.path.join(out_dir, video_source.shard_name(shard_index, num_shards))
    summary = os.path.join(out_dir, summary_name(shard_index, num_shards))
    if not (os.path.isfile(shard) and os.path.isfile(summary)):
        return False
    with open(summary, encoding="utf-8") as f:
        clips = json.load(f).get("clips")
    _, problem = shards.shard_problem(shard, clips)
    if problem is not None:
        logging.warning("ingest: rewriting shard %s: %s", shard, problem)
    return problem is None


_progress_queue: Any = None


def init_worker(progress_queue: Any) -> None:
    """Pool initializer of ingest workers: progress goes to `progress_queue`, FFmpeg stays quiet."""
    global _progress_queue
    _progress_queue = progress_queue
    av.logging.set_level(av.logging.PANIC)


def write_shard(
    out_dir: str,
    shard_index: int,
    num_shards: int,
    files: Sequence[VideoFile],
    options: ClipOptions,
    progress: Callable[[dict[str, int]], None] | None = None,
) -> dict[str, Any]:
    """Writes one shard from its files (in order) and returns its summary (clips, frames, skipped)."""
    name = video_source.shard_name(shard_index, num_shards)
    tmp = _tmp_path(out_dir, name)
    if progress is None and _progress_queue is not None:
        progress = _progress_queue.put
    summary: dict[str, Any] = {
        "shard": name,
        "files": len(files),
        "videos_used": 0,
        "clips": 0,
        "frames": 0,
        "skipped": [],
    }
    writer = array_record_module.ArrayRecordWriter(tmp, video_source.ARRAY_RECORD_WRITER_OPTIONS)
    try:
        for video in files:
            clips: list[bytes] = []
            reason = _empty_file_reason(video.path)
            if reason is None:
                try:
                    # A file's clips are written only once all of it decoded: a truncated or corrupt
                    # file is skipped whole rather than contributing a prefix.
                    clips = list(video_clips(video, options))
                except SkipVideo as e:
                    reason = str(e)
                except Exception as e:  # noqa: BLE001  One odd file must not stop a million-file run.
                    reason = f"failed: {type(e).__name__}: {e}"
            if reason is not None:
                summary["skipped"].append({"path": video.source, "reason": reason})
                clips = []
            for clip in clips:
                writer.write(clip)
            summary["videos_used"] += bool(clips)
            summary["clips"] += len(clips)
            summary["frames"] += len(clips) * options.num_frames
            if progress is not None:
                progress({"files": 1, "clips": len(clips), "frames": len(clips) * options.num_frames})
    finally:
        writer.close()
    _fsync_file(tmp)  # The rename below must never publish a shard whose bytes are still in flight.
    # Summary first, shard last: the shard's final name is the commit point readers rely on.
    write_json_atomic(os.path.join(out_dir, summary_name(shard_index, num_shards)), summary)
    os.replace(tmp, os.path.join(out_dir, name))
    return summary


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _empty_file_reason(path: str) -> str | None:
    try:
        return "empty file (0 bytes)" if os.path.getsize(path) == 0 else None
    except OSError as e:
        return f"cannot read: {e}"


def write_shard_job(args: tuple[str, int, int, list[VideoFile], ClipOptions]) -> dict[str, Any]:
    """`write_shard` on one tuple of arguments, for `Pool.map`."""
    return write_shard(*args)
