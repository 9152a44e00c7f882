"""Ingest captioned video files into ArrayRecord clip shards for video pretraining.

    python -m data_pipelines.ingest_video --videos='raw/**/*.mp4' --captions=raw/captions.jsonl \
        --out=shards/ --num_frames=9 --fps=8 --resolution=256,256 --num_shards=64 --workers=8

Each video (mp4, webm, mkv: anything FFmpeg decodes) is sampled at --fps and cut into clips of
--num_frames (1 + 4k) frames, one clip starting every --clip_stride_s seconds; frames are resized to
--resolution with a center crop or black padding and stored encoded (JPEG or PNG) with the clip's
caption, source file, start time, frame times and fps (see `video_source.pack_clip_record`).

Files are assigned to shards by their sorted relative path, so the same inputs and flags give
byte-identical shards whatever the worker count. A shard is written under a temp name and renamed
when complete; a re-run skips shards already complete, so a killed ingest resumes. Files that cannot
be used (undecodable, truncated, empty, no caption, shorter than one clip) are skipped and listed in
`OUT/ingest_report.json` with their reason.

captions.jsonl holds one {"video": "<relative path or file name>", "caption": "..."} per line; the
path is matched relative to --video_root (default: the captions file's directory), then by file name.
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import av
import numpy as np
from absl import app, flags, logging
from array_record.python import array_record_module
from av.video.reformatter import VideoReformatter
from PIL import Image

from data_pipelines import video_source

REPORT_NAME = "ingest_report.json"
CONFIG_NAME = "ingest_config.json"
IMAGE_FORMATS = ("jpeg", "png")
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ClipOptions:
    """How clips are cut and stored; part of the ingest config that a resumed run must match."""

    num_frames: int
    fps: float  # 0: the video's own frame rate.
    resolution: tuple[int, int]
    resize_mode: str
    clip_stride_s: float | None  # None: back-to-back clips (stride = num_frames / fps).
    image_format: str
    jpeg_quality: int


@dataclass(frozen=True)
class VideoFile:
    """One input video: where it is, its name in shards and report, its caption."""

    path: str
    source: str
    caption: str


class SkipVideo(Exception):
    """A video that cannot give clips; the message is the reason written to the report."""


# --------------------------------------------------------------------------------------------------
# Planning: which files, which captions, which shard.
# --------------------------------------------------------------------------------------------------


def load_captions(captions_path: str) -> dict[str, str]:
    """Reads captions.jsonl into {normalized video path: caption}; errors name the file and line."""
    captions: dict[str, str] = {}
    with open(captions_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{captions_path}:{line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
                raise ValueError(f'{where}: expected {{"video": "<path>", "caption": "..."}}, got {line.strip()}')
            caption = entry.get("caption")
            if not isinstance(caption, str):
                raise ValueError(f"{where}: caption of {entry['video']!r} is {caption!r}, expected a string")
            captions[os.path.normpath(entry["video"])] = caption
    return captions


def _expand_videos(videos: str | Sequence[str]) -> list[str]:
    patterns = [p for p in videos.split(",") if p] if isinstance(videos, str) else list(videos)
    paths: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(pattern):
            paths.add(pattern)
        else:
            raise FileNotFoundError(f"video file {pattern!r} does not exist")
    return list(paths)


def _source_name(path: str, video_root: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(video_root))
    return os.path.normpath(path) if relative.startswith("..") else relative


def plan_videos(
    videos: str | Sequence[str], captions_path: str, video_root: str | None = None
) -> tuple[list[VideoFile], list[dict[str, str]]]:
    """Captioned videos sorted by source name, and the report entries of videos without a caption."""
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(captions_path))
    captions = load_captions(captions_path)
    by_basename: dict[str, list[str]] = {}
    for key, caption in captions.items():
        by_basename.setdefault(os.path.basename(key), []).append(caption)
    planned, skipped = [], []
    for path in _expand_videos(videos):
        source = _source_name(path, root)
        caption = captions.get(source)
        if caption is None and len(by_basename.get(os.path.basename(source), [])) == 1:
            caption = by_basename[os.path.basename(source)][0]
        if caption is None:
            skipped.append({"path": source, "reason": f"no caption in {os.path.basename(captions_path)}"})
        else:
            planned.append(VideoFile(path=path, source=source, caption=caption))
    planned.sort(key=lambda v: v.source)
    names = [v.source for v in planned]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"videos {duplicates} appear twice under different paths; give one glob per file")
    skipped.sort(key=lambda entry: entry["path"])
    return planned, skipped


def assign_shards(files: Sequence[VideoFile], num_shards: int) -> list[list[VideoFile]]:
    """Round-robin over the sorted files: deterministic and balanced in file count."""
    return [list(files[i::num_shards]) for i in range(num_shards)]


# --------------------------------------------------------------------------------------------------
# Decoding: one video -> sampled, resized frames -> clips.
# --------------------------------------------------------------------------------------------------


def _resize_frame(
    frame: av.VideoFrame, reformatter: VideoReformatter, resolution: tuple[int, int], resize_mode: str
) -> np.ndarray:
    scaled_h, scaled_w = video_source.scaled_size(frame.height, frame.width, resolution, resize_mode)
    # One reformatter per video keeps FFmpeg's scaler context: ~20x faster than frame.to_ndarray(w, h).
    rgb = reformatter.reformat(
        frame, width=scaled_w, height=scaled_h, format="rgb24", interpolation="AREA"
    ).to_ndarray()
    return video_source.crop_or_pad(rgb, resolution)


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 90) -> bytes:
    """Encodes an RGB uint8 image as JPEG or PNG bytes (deterministic for the same pixels)."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality)
    elif image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    else:
        raise ValueError(f"image_format={image_format!r}, expected one of {IMAGE_FORMATS}")
    return buffer.getvalue()


def sample_frames(path: str, fps: float) -> Iterator[tuple[float, av.VideoFrame, float]]:
    """Yields (time since the first frame, frame, sampling fps) at `fps` (0: every decoded frame).

    A sample at time T is the frame on screen at T: the last one whose timestamp is <= T.
    Raises SkipVideo for files FFmpeg cannot open or that end well before their stated duration.
    """
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        # FFmpeg's message repeats the full path; the report already names the file.
        message = str(e).replace(path, os.path.basename(path))
        raise SkipVideo(f"cannot decode: {type(e).__name__}: {message}") from e
    with container:
        if not container.streams.video:
            raise SkipVideo("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
        sample_fps = float(fps) if fps > 0 else source_fps
        tolerance = 1e-3 / sample_fps
        first_time = None
        held: tuple[float, av.VideoFrame] | None = None
        next_sample = 0
        last_time = None
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else index / source_fps
                if first_time is None:
                    first_time = t
                t -= first_time
                if last_time is not None and t <= last_time:
                    continue  # A repeated or out-of-order timestamp adds no new picture.
                last_time = t
                if fps <= 0:
                    yield t, frame, sample_fps
                    continue
                if held is not None:
                    while next_sample / sample_fps + tolerance < t:
                        yield held[0], held[1], sample_fps
                        next_sample += 1
                held = (t, frame)
        except av.error.FFmpegError as e:
            message = str(e).replace(path, os.path.basename(path))
            raise SkipVideo(f"cannot decode: {type(e).__name__}: {message}") from e
        if last_time is None:
            raise SkipVideo("no decodable frames")
        if held is not None:
            # The last frame stays on screen for one source frame period.
            while next_sample / sample_fps + tolerance < held[0] + 1.0 / source_fps:
                yield held[0], held[1], sample_fps
                next_sample += 1
        _check_not_truncated(stream, container, last_time + 1.0 / source_fps, source_fps)


def _check_not_truncated(stream: Any, container: Any, decoded_s: float, source_fps: float) -> None:
    if stream.duration is not None and stream.time_base is not None:
        stated_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        stated_s = container.duration / av.time_base
    else:
        return
    # Containers round durations and may count audio; only a clear shortfall means truncation.
    if decoded_s + 2.0 / source_fps < 0.9 * stated_s:
        raise SkipVideo(f"truncated: decoded {decoded_s:.2f}s of a stated {stated_s:.2f}s")


def video_clips(video: VideoFile, options: ClipOptions) -> Iterator[bytes]:
    """Yields the packed clip records of one video, in time order."""
    num_frames = options.num_frames
    window: list[tuple[int, float, bytes]] = []  # (sample index, time, encoded) of pending clips.
    last_encoded: tuple[float, bytes] | None = None
    sample_index = 0
    clip_index = 0
    sample_fps = 0.0
    stride = 0
    reformatter = VideoReformatter()
    for t, frame, sample_fps in sample_frames(video.path, options.fps):
        if not stride:
            stride_s = options.clip_stride_s if options.clip_stride_s else num_frames / sample_fps
            stride = max(1, round(stride_s * sample_fps))
        # Only samples inside some clip are resized and encoded; with a long stride most are not.
        if sample_index % stride < num_frames:
            if last_encoded is None or last_encoded[0] != t:  # Upsampling repeats a picture.
                image = _resize_frame(frame, reformatter, options.resolution, options.resize_mode)
                last_encoded = (t, encode_image(image, options.image_format, options.jpeg_quality))
            window.append((sample_index, t, last_encoded[1]))
        clip_start = sample_index - num_frames + 1
        if clip_start >= 0 and clip_start % stride == 0:
            clip = [entry for entry in window if entry[0] >= clip_start]
            times = [entry[1] for entry in clip]
            yield video_source.pack_clip_record(
                frames=[entry[2] for entry in clip],
                image_format=options.image_format,
                height=options.resolution[0],
                width=options.resolution[1],
                caption=video.caption,
                source=video.source,
                clip_index=clip_index,
                start_time=times[0],
                frame_times=times,
                fps=sample_fps,
            )
            clip_index += 1
            window = [entry for entry in window if entry[0] >= clip_start + stride]
        sample_index += 1
    if clip_index == 0:
        raise SkipVideo(f"too short: {sample_index} frames at {sample_fps:g} fps, one clip needs {num_frames}")


# --------------------------------------------------------------------------------------------------
# Shards: write one atomically, with its summary beside it.
# --------------------------------------------------------------------------------------------------


def _summary_name(shard_index: int, num_shards: int) -> str:
    return video_source.shard_name(shard_index, num_shards).replace(video_source.SHARD_SUFFIX, ".json")


def _tmp_path(out_dir: str, name: str) -> str:
    # The leading dot and suffix keep temp files out of every reader's shard pattern.
    return os.path.join(out_dir, f".{name}{_TMP_SUFFIX}")


def _write_json_atomic(path: str, content: Any) -> None:
    tmp = _tmp_path(os.path.dirname(path), os.path.basename(path))
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_complete(out_dir: str, shard_index: int, num_shards: int) -> bool:
    """Whether a shard and its summary were both finished by an earlier (or this) run."""
    return os.path.isfile(os.path.join(out_dir, video_source.shard_name(shard_index, num_shards))) and os.path.isfile(
        os.path.join(out_dir, _summary_name(shard_index, num_shards))
    )


_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
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
    _write_json_atomic(os.path.join(out_dir, _summary_name(shard_index, num_shards)), summary)
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


def _write_shard_job(args: tuple[str, int, int, list[VideoFile], ClipOptions]) -> dict[str, Any]:
    return write_shard(*args)


# --------------------------------------------------------------------------------------------------
# The run: plan, resume check, parallel shards, progress, report.
# --------------------------------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar (carriage return on a terminal, periodic log lines otherwise)."""

    def __init__(self, total_files: int, enabled: bool):
        self.total_files = total_files
        self.enabled = enabled
        self.counts = {"files": 0, "clips": 0, "frames": 0}
        self.start = time.monotonic()
        self.last_print = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, delta: dict[str, int]) -> None:
        for key, value in delta.items():
            self.counts[key] += value
        self.show(final=False)

    def show(self, final: bool) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last_print < (0.2 if self.tty else 10.0):
            return
        self.last_print = now
        elapsed = max(now - self.start, 1e-9)
        done = self.counts["files"]
        width = 30
        filled = int(width * done / max(self.total_files, 1))
        line = (
            f"ingest [{'#' * filled}{'.' * (width - filled)}] files {done}/{self.total_files} "
            f"clips {self.counts['clips']} frames {self.counts['frames']} "
            f"({self.counts['frames'] / elapsed:.0f} frames/s)"
        )
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            logging.info(line)


def _check_resume_config(out_dir: str, config: dict[str, Any]) -> None:
    path = os.path.join(out_dir, CONFIG_NAME)
    if not os.path.exists(path):
        _write_json_atomic(path, config)
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
        if name.startswith(".") and name.endswith(_TMP_SUFFIX):
            os.remove(os.path.join(out_dir, name))  # Left by a killed run; never a finished shard.

    shards = assign_shards(files, num_shards)
    todo = [i for i in range(num_shards) if not shard_complete(out_dir, i, num_shards)]
    resumed = num_shards - len(todo)
    progress = _Progress(sum(len(shards[i]) for i in todo), show_progress)
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

    report = _make_report(out_dir, num_shards, no_caption, options)
    _write_json_atomic(os.path.join(out_dir, REPORT_NAME), report)
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


def _run_parallel(jobs: list[tuple], workers: int, progress: _Progress) -> None:
    # Spawned (not forked) workers: the caller may hold threads (JAX, TF, Grain) that fork would copy.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    with context.Pool(workers, initializer=_init_worker, initargs=(progress_queue,)) as pool:
        pending = pool.map_async(_write_shard_job, jobs, chunksize=1)
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


def _make_report(
    out_dir: str, num_shards: int, no_caption: list[dict[str, str]], options: ClipOptions
) -> dict[str, Any]:
    summaries = []
    for i in range(num_shards):
        with open(os.path.join(out_dir, _summary_name(i, num_shards)), encoding="utf-8") as f:
            summaries.append(json.load(f))
    skipped = sorted(no_caption + [entry for s in summaries for entry in s["skipped"]], key=lambda entry: entry["path"])
    return {
        "videos_found": sum(s["files"] for s in summaries) + len(no_caption),
        "videos_used": sum(s["videos_used"] for s in summaries),
        "videos_skipped": len(skipped),
        "clips": sum(s["clips"] for s in summaries),
        "frames": sum(s["frames"] for s in summaries),
        "num_shards": num_shards,
        "shards": {s["shard"]: s["clips"] for s in summaries},
        "skipped": skipped,
        "options": asdict(options) | {"resolution": list(options.resolution)},
    }


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
