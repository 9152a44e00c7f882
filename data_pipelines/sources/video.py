"""Grain source over captioned-video clip shards written by `wamjax.jobs.ingest_video`.

A shard is an ArrayRecord file named `video-SSSSS-of-NNNNN.array_record`; each record is one clip, a
msgpack map (see `pack_clip_record`) of encoded frames, caption, source file, start time and fps.
`make_video_dataset` turns the shards into per-example dicts in the data contract shared by every
source: `frames`, `frame_mask`, `actions`, `action_mask`, `action_dim_mask`, `has_actions`, `proprio`,
`instruction`, `dataset_index`. Video-only clips carry zero actions and proprio with all-False action masks and
`has_actions` False.
"""

from __future__ import annotations

import glob
import io
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from array_record.python import array_record_data_source
from PIL import Image

from data_pipelines.sources import shards as shards_lib

if TYPE_CHECKING:
    import grain

SHARD_PREFIX = "video"
SHARD_SUFFIX = ".array_record"
# Group size 1 keeps random access to a single clip a single read; clips are large (several encoded
# frames) and JPEG/PNG bytes do not compress further, so the records are stored uncompressed.
ARRAY_RECORD_WRITER_OPTIONS = "group_size:1,uncompressed"
RECORD_FORMAT_VERSION = 1
RESIZE_MODES = ("crop", "pad")
DATASET_NAME = "captioned_video"  # how errors and bad-shard counts name these shards

_SHARD_NAME_RE = re.compile(rf"^{SHARD_PREFIX}-(\d{{5}})-of-(\d{{5}}){re.escape(SHARD_SUFFIX)}$")
_RECORD_KEYS = (
    "version",
    "frames",
    "image_format",
    "height",
    "width",
    "caption",
    "source",
    "clip_index",
    "start_time",
    "frame_times",
    "fps",
)


def shard_name(shard_index: int, num_shards: int) -> str:
    """Final file name of shard `shard_index` out of `num_shards`."""
    return f"{SHARD_PREFIX}-{shard_index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def pack_clip_record(
    *,
    frames: Sequence[bytes],
    image_format: str,
    height: int,
    width: int,
    caption: str,
    source: str,
    clip_index: int,
    start_time: float,
    frame_times: Sequence[float],
    fps: float,
) -> bytes:
    """Serializes one clip (encoded frames plus metadata) to the bytes of one ArrayRecord record."""
    record = {
        "version": RECORD_FORMAT_VERSION,
        "frames": list(frames),
        "image_format": image_format,
        "height": int(height),
        "width": int(width),
        "caption": caption,
        "source": source,
        "clip_index": int(clip_index),
        "start_time": float(start_time),
        "frame_times": [float(t) for t in frame_times],
        "fps": float(fps),
    }
    return msgpack.packb(record, use_bin_type=True)


def unpack_clip_record(data: bytes) -> dict[str, Any]:
    """Inverse of `pack_clip_record`; raises ValueError naming the missing keys for foreign records."""
    record = msgpack.unpackb(data, raw=False)
    if not isinstance(record, dict):
        raise ValueError(f"clip record is a {type(record).__name__}, expected a msgpack map")
    missing = [key for key in _RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"clip record lacks keys {missing}; expected {list(_RECORD_KEYS)}")
    if record["version"] != RECORD_FORMAT_VERSION:
        raise ValueError(f"clip record version {record['version']}, expected {RECORD_FORMAT_VERSION}")
    return record


def find_shards(shards: str | Sequence[str], *, require_complete: bool = True) -> list[str]:
    """Sorted list of finished shard files from a directory, a glob, or an explicit list of paths.

    Temp files of an unfinished ingest never match (they start with '.' and end in '.tmp').
    With `require_complete`, every `-of-N` set must have all N shards, so a directory whose ingest
    is still running (or was killed) is refused instead of read partially.
    """
    if isinstance(shards, str):
        pattern = os.path.join(shards, f"{SHARD_PREFIX}-*{SHARD_SUFFIX}") if os.path.isdir(shards) else shards
        paths = glob.glob(pattern, recursive=True)
        where = pattern
    else:
        paths = list(shards)
        where = f"{len(paths)} given paths"
    paths = sorted(p for p in paths if not os.path.basename(p).startswith(".") and p.endswith(SHARD_SUFFIX))
    if not paths:
        raise FileNotFoundError(
            f"no video shards match {where}; expected files named "
            f"{SHARD_PREFIX}-SSSSS-of-NNNNN{SHARD_SUFFIX} written by wamjax.jobs.ingest_video"
        )
    missing_paths = [p for p in paths if not os.path.isfile(p)]
    if missing_paths:
        raise FileNotFoundError(f"video shards do not exist: {missing_paths[:5]}")
    if require_complete:
        _check_complete(paths)
    return paths


def _check_complete(paths: Sequence[str]) -> None:
    present: dict[tuple[str, int], set[int]] = {}
    for path in paths:
        match = _SHARD_NAME_RE.match(os.path.basename(path))
        if match is None:
            continue
        index, count = int(match.group(1)), int(match.group(2))
        present.setdefault((os.path.dirname(path), count), set()).add(index)
    for (directory, count), indices in present.items():
        missing = sorted(set(range(count)) - indices)
        if missing:
            raise FileNotFoundError(
                f"video shards in {directory or '.'} are incomplete: shard indices {missing[:10]} of "
                f"{count} are missing (ingest unfinished?); re-run wamjax.jobs.ingest_video to "
                "finish them, or pass require_complete=False"
            )


class VideoClipSource:
    """Random access to the clip records of video shards; each item is an unpacked clip record.

    Implements Grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`) and pickles into
    Grain worker processes. Items hold encoded frames (bytes) and metadata; `make_video_dataset`
    decodes them. Every shard is opened once here: an unreadable one (truncated, half-copied) raises
    `BadShardError` naming the file, or with `skip_bad_shards` is left out (listed in `bad_shards`,
    counted under `DATASET_NAME` by `shards.bad_shard_counts`).
    """

    def __init__(self, shards: str | Sequence[str], *, require_complete: bool = True, skip_bad_shards: bool = False):
        paths = find_shards(shards, require_complete=require_complete)
        good, self.bad_shards = shards_lib.check_shards(
            DATASET_NAME,
            paths,
            skip_bad=skip_bad_shards,
            remedy="re-copy the file or re-run wamjax.jobs.ingest_video on its directory to rewrite it",
        )
        self._paths = [paths[i] for i, _ in good]
        # array_record's own source, not grain's wrapper: ingest workers import this module for the
        # record format, and importing grain pulls in JAX (seconds per spawned worker).
        self._source = array_record_data_source.ArrayRecordDataSource(
            shards_lib.sliced_paths(self._paths, [records for _, records in good])
        )

    @property
    def paths(self) -> list[str]:
        """The shard files read, in order."""
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        return unpack_clip_record(self._source[index])

    def __repr__(self) -> str:
        return f"VideoClipSource({len(self._paths)} shards, {len(self)} clips)"


def fit_to_resolution(image: np.ndarray, resolution: tuple[int, int], resize_mode: str) -> np.ndarray:
    """Resizes an RGB uint8 image [h, w, 3] to `resolution` (H, W), keeping its aspect ratio.

    'crop' scales to cover (H, W) and cuts the center; 'pad' scales to fit inside and pads with black.
    """
    height, width = resolution
    if image.shape[:2] == (height, width):
        return image
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r}, expected one of {RESIZE_MODES}")
    scaled_h, scaled_w = scaled_size(image.shape[0], image.shape[1], resolution, resize_mode)
    scaled = np.asarray(Image.fromarray(image).resize((scaled_w, scaled_h), Image.Resampling.BILINEAR))
    return crop_or_pad(scaled, resolution)


def scaled_size(src_h: int, src_w: int, resolution: tuple[int, int], resize_mode: str) -> tuple[int, int]:
    """Size (h, w) an image of (src_h, src_w) is scaled to before center crop/pad to `resolution`."""
    height, width = resolution
    if resize_mode == "crop":
        scale = max(height / src_h, width / src_w)
        return max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if resize_mode == "pad":
        scale = min(height / src_h, width / src_w)
        return min(height, max(1, round(src_h * scale))), min(width, max(1, round(src_w * scale)))
    raise ValueError(f"resize_mode={resize_mode!r}, expected one of {RESIZE_MODES}")


def crop_or_pad(image: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """Center-crops the dimensions larger than `resolution` and black-pads the smaller ones."""
    height, width = resolution
    h, w = image.shape[:2]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    image = image[top : top + height, left : left + width]
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(image)
    out = np.zeros((height, width) + image.shape[2:], dtype=image.dtype)
    top, left = (height - h) // 2, (width - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def decode_image(data: bytes) -> np.ndarray:
    """Decodes JPEG/PNG bytes to an RGB uint8 array [h, w, 3]."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


class ClipToExample:
    """Decodes a clip record into a per-example dict of the shared data contract (a Grain map)."""

    def __init__(
        self,
        *,
        num_frames: int,
        resolution: tuple[int, int],
        resize_mode: str = "crop",
        proprio_dim: int = 8,
        action_dim: int = 7,
        dataset_index: int = 0,
        include_metadata: bool = False,
        num_actions: int | None = None,
        num_states: int | None = None,
    ):
        self.num_frames = num_frames
        self.num_states = num_states  # one (zero) state per chunk when given, else one per clip
        self.num_actions = num_frames - 1 if num_actions is None else int(num_actions)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.resize_mode = resize_mode
        self.proprio_dim = proprio_dim
        self.action_dim = action_dim
        self.dataset_index = dataset_index
        self.include_metadata = include_metadata

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        encoded = record["frames"]
        if not encoded:
            raise ValueError(f"clip {record['clip_index']} of {record['source']!r} has no frames")
        used = encoded[: self.num_frames]
        frames = np.stack([fit_to_resolution(decode_image(data), self.resolution, self.resize_mode) for data in used])
        frame_mask = np.ones((self.num_frames,), dtype=bool)
        if len(used) < self.num_frames:
            # Short clips follow the episode-end convention: repeat the last frame, mask it out.
            pad = np.repeat(frames[-1:], self.num_frames - len(used), axis=0)
            frames = np.concatenate([frames, pad], axis=0)
            frame_mask[len(used) :] = False
        example = {
            "frames": frames,
            "frame_mask": frame_mask,
            "actions": np.zeros((self.num_actions, self.action_dim), dtype=np.float32),
            "action_mask": np.zeros((self.num_actions,), dtype=bool),
            "action_dim_mask": np.ones((self.action_dim,), dtype=bool),
            "has_actions": np.bool_(False),
            "proprio": np.zeros((*(() if self.num_states is None else (self.num_states,)), self.proprio_dim),
                                dtype=np.float32),
            "instruction": np.str_(record["caption"]),
            "dataset_index": np.int32(self.dataset_index),
        }
        if self.include_metadata:
            times = list(record["frame_times"][: self.num_frames])
            times += [times[-1]] * (self.num_frames - len(times))
            example["clip_source"] = np.str_(record["source"])
            example["clip_start_time"] = np.float32(record["start_time"])
            example["clip_frame_times"] = np.asarray(times, dtype=np.float32)
            example["clip_fps"] = np.float32(record["fps"])
        return example


def make_video_dataset(
    shards: str | Sequence[str],
    *,
    num_frames: int,
    resolution: tuple[int, int],
    proprio_dim: int = 8,
    action_dim: int = 7,
    dataset_index: int = 0,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    resize_mode: str = "crop",
    include_metadata: bool = False,
    require_complete: bool = True,
    skip_bad_shards: bool = False,
    num_actions: int | None = None,
    num_states: int | None = None,
) -> grain.MapDataset:
    """Grain MapDataset of contract examples (one clip each) from a shard directory, glob or path list.

    Clips are shuffled globally with `seed` (each epoch differently), repeated `num_epochs` times
    (None: forever), and decoded to `num_frames` frames of `resolution` (H, W). Clips stored with more
    frames are cut to the first `num_frames`; shorter ones are padded with the last frame, masked
    out. `include_metadata` adds `clip_source`, `clip_start_time`, `clip_frame_times` and `clip_fps`
    (not part of the shared contract: leave it off when mixing with other sources). An unreadable
    shard raises `BadShardError`, or with `skip_bad_shards` is skipped, counted and logged. `num_actions`
    sizes the (all-masked) action chunk to match the robot clips it mixes with (default num_frames - 1), and
    `num_states` their per-chunk proprio ([num_states, proprio_dim] zeros; default one state, [proprio_dim]).
    """
    if num_frames < 1 or (num_frames - 1) % 4 != 0:
        raise ValueError(f"num_frames={num_frames}, expected 1 + 4k (Wan VAE's causal 4x time compression)")
    if len(resolution) != 2 or min(resolution) < 1:
        raise ValueError(f"resolution={resolution}, expected (H, W) with positive sizes")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r}, expected one of {RESIZE_MODES}")
    import grain  # Deferred: see VideoClipSource.__init__.

    source = VideoClipSource(shards, require_complete=require_complete, skip_bad_shards=skip_bad_shards)
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if num_epochs != 1:
        dataset = dataset.repeat(num_epochs)
    return dataset.map(
        ClipToExample(
            num_frames=num_frames,
            resolution=resolution,
            resize_mode=resize_mode,
            proprio_dim=proprio_dim,
            action_dim=action_dim,
            dataset_index=dataset_index,
            num_actions=num_actions,
            num_states=num_states,
            include_metadata=include_metadata,
        )
    )
