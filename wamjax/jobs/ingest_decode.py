"""Decoding for video ingest: one video -> sampled, resized, encoded frames -> packed clip records.

Each video (mp4, webm, mkv: anything FFmpeg decodes) is sampled at a fixed fps and cut into clips of
1 + 4k frames, one clip starting every `clip_stride_s` seconds; frames are resized with a center crop or
black padding and stored encoded (JPEG or PNG) with the clip's caption, source file, start time, frame
times and fps (see `video_source.pack_clip_record`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from data_pipelines.sources import video as video_source
from wamjax.jobs.ingest_plan import VideoFile

IMAGE_FORMATS = ("jpeg", "png")


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



class SkipVideo(Exception):
    """A video that cannot give clips; the message is the reason written to the report."""



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
