"""Random access to standardized RLDS episodes of one TFDS dataset stored as ArrayRecord.

Records are read with Grain's ArrayRecord data source and decoded with the dataset's own TFDS feature
spec, except images: those stay encoded until a clip picks its frames, so reading an episode costs one
record read and only the chosen frames are decoded.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import os
import threading
from collections import Counter
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from data_pipelines.sources import shards
from data_pipelines.standardize import registry

_BAD_RECORDS: Counter[str] = Counter()
_BAD_RECORDS_LOCK = threading.Lock()


class BadRecordError(ValueError):
    """A record that cannot be read or standardized; names the dataset, file and record index."""

    def __init__(self, dataset: str, filename: str, record_index: int, reason: str):
        self.dataset, self.filename, self.record_index, self.reason = dataset, filename, record_index, reason
        super().__init__(f"Bad record in dataset {dataset!r}, file {filename}, record {record_index}: {reason}")


def count_bad_record(error: BadRecordError) -> int:
    """Counts and logs a skipped bad record; returns how many of its dataset this process skipped."""
    with _BAD_RECORDS_LOCK:
        _BAD_RECORDS[error.dataset] += 1
        count = _BAD_RECORDS[error.dataset]
    logging.warning("Skipping (%d so far in %s): %s", count, error.dataset, error)
    return count


def bad_record_counts() -> dict[str, int]:
    """Bad records skipped so far in this process, per dataset (Grain workers count their own)."""
    with _BAD_RECORDS_LOCK:
        return dict(_BAD_RECORDS)


@dataclasses.dataclass
class Episode:
    """One standardized episode; images stay encoded (bytes) until `decode_frame`."""

    dataset: str
    filename: str
    record_index: int
    primary_images: list[bytes]
    wrist_images: list[bytes] | None
    image_shape: tuple[int, int, int]  # (H, W, C) the feature spec promises for the primary camera
    wrist_image_shape: tuple[int, int, int] | None
    actions: np.ndarray  # float32 [L, 7], raw (not normalized)
    proprio: np.ndarray  # float32 [L, p], raw
    instruction: str
    # Every camera read (the primary, the wrist and those `data.cameras` asks for), by observation key.
    camera_images: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    camera_shapes: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.primary_images)

    @property
    def has_wrist(self) -> bool:
        """Whether the dataset's spec names a wrist camera."""
        return self.wrist_images is not None

    def decode_frame(self, index: int, size: tuple[int, int] | None, wrist: bool = False) -> np.ndarray:
        """Decodes frame `index` of the primary (or wrist) camera to uint8 [H, W, 3], resized to `size`."""
        images, shape = (
            (self.wrist_images, self.wrist_image_shape) if wrist else (self.primary_images, self.image_shape)
        )
        return self._decode(images, shape, "wrist" if wrist else "primary", index, size)

    def decode_camera(self, camera: str, index: int, size: tuple[int, int] | None) -> np.ndarray:
        """Decodes frame `index` of camera `camera` (an observation key) to uint8 [H, W, 3], resized to `size`."""
        if camera not in self.camera_images:
            raise KeyError(f"{self.dataset}: camera {camera!r} was not read; read: {sorted(self.camera_images)}")
        return self._decode(self.camera_images[camera], self.camera_shapes[camera], camera, index, size)

    def _decode(
        self, images: list[bytes], shape: tuple[int, int, int] | None, camera: str, index: int,
        size: tuple[int, int] | None,
    ) -> np.ndarray:
        try:
            image = Image.open(io.BytesIO(images[index]))
            width, height = image.size
            if shape is not None and (height, width) != tuple(shape[:2]):
                raise BadRecordError(
                    self.dataset,
                    self.filename,
                    self.record_index,
                    f"{camera} frame {index} is {height}x{width}, the feature spec says {shape[0]}x{shape[1]}",
                )
            if size is not None:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: much cheaper than full size + resize.
                image.draft("RGB", (size[1], size[0]))
            image.load()
        except BadRecordError:
            raise
        except Exception as e:  # PIL raises several types for truncated or garbled data
            raise BadRecordError(self.dataset, self.filename, self.record_index, f"{camera} frame {index}: {e}") from e
        frame = np.asarray(image.convert("RGB"))
        if size is not None and frame.shape[:2] != tuple(size):
            frame = np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BILINEAR))
        return frame


def find_dataset_dir(data_dir: str, name: str) -> str:
    """Returns the TFDS directory `data_dir/name/<version>` (newest version) of dataset `name`."""
    root = os.path.join(data_dir, name)
    if os.path.exists(os.path.join(root, "dataset_info.json")):
        return root
    versions = []
    if os.path.isdir(root):
        versions = [v for v in os.listdir(root) if os.path.exists(os.path.join(root, v, "dataset_info.json"))]
    if not versions:
        raise FileNotFoundError(
            f"Dataset {name!r}: no TFDS dataset (dataset_info.json) under {root}; expected "
            f"{root}/<version>/ as written by tfds or `python -m data_pipelines.make_oxe_like`"
        )
    versions.sort(key=lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split(".")))
    return os.path.join(root, versions[-1])


def _feature_shape(features: Any, camera: str | None) -> tuple[int, int, int] | None:
    if camera is None:
        return None
    return tuple(features["steps"].feature["observation"][camera].shape)


class EpisodeSource:
    """Random-access standardized episodes of TFDS dataset `name` under `data_dir` (one split).

    Picklable (Grain workers rebuild the readers lazily), `len()` is the number of episodes, and
    `source[i]` returns an `Episode` or raises `BadRecordError`.

    Every shard is opened once here (`data_pipelines.sources.shards`): an unreadable one (truncated, half-copied)
    raises `BadShardError` naming the dataset and file, or with `skip_bad_shards` is left out with its
    episodes (listed in `bad_shards`, counted by `shards.bad_shard_counts`).
    """

    def __init__(
        self, data_dir: str, name: str, split: str = "train", *, skip_bad_shards: bool = False,
        cameras: tuple[str, ...] = (),
    ):
        self.name = name
        self.spec = registry.get_spec(name)
        self.extra_cameras = tuple(cameras)  # observation keys read besides the primary and wrist cameras
        self.dataset_dir = find_dataset_dir(data_dir, name)
        self.split = split
        builder = tfds.builder_from_directory(self.dataset_dir)
        info = builder.info
        if split not in info.splits:
            raise KeyError(f"Dataset {name!r} at {self.dataset_dir} has no split {split!r}; has {list(info.splits)}")
        if info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(
                f"Dataset {name!r} at {self.dataset_dir} is stored as {info.file_format.value}; "
                "random access needs array_record. Convert it once with `python -m data_pipelines.convert`."
            )
        filenames = [os.path.join(self.dataset_dir, f) for f in info.splits[split].filenames]
        good, self.bad_shards = shards.check_shards(
            name, filenames, list(info.splits[split].shard_lengths), skip_bad=skip_bad_shards
        )
        self.filenames = [filenames[i] for i, _ in good]
        self._shard_lengths = [records for _, records in good]
        self._shard_starts = list(np.cumsum([0, *self._shard_lengths[:-1]]).astype(int))
        self._length = int(sum(self._shard_lengths))
        self._reader: Any = None
        self._features: Any = info.features

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = state["_features"] = None
        state["spec"] = None  # specs hold lambdas; look the spec up again by name
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.spec = registry.get_spec(self.name)

    def locate(self, index: int) -> tuple[str, int]:
        """Returns (file, record index within that file) of episode `index`."""
        shard = bisect.bisect_right(self._shard_starts, index) - 1
        return self.filenames[shard], index - self._shard_starts[shard]

    def _open(self) -> None:
        if self._features is None:
            self._features = tfds.builder_from_directory(self.dataset_dir).info.features
        if self._reader is None:
            paths = shards.sliced_paths(self.filenames, self._shard_lengths)
            self._reader = grain.sources.ArrayRecordDataSource(paths)

    def __getitem__(self, index: int) -> Episode:
        if not 0 <= index < self._length:
            raise IndexError(f"Dataset {self.name!r}: episode {index} out of range [0, {self._length})")
        self._open()
        filename, record_index = self.locate(index)
        try:
            return self._read(index, filename, record_index)
        except BadRecordError:
            raise
        except Exception as e:  # any parse / missing key / dtype failure of this one record
            raise BadRecordError(self.name, filename, record_index, self._diagnose(index, e)) from e

    def _check_image_headers(self, steps: list[Any], camera: str, filename: str, record_index: int) -> None:
        # Reading only the image headers is cheap and catches wrong shapes before a clip needs the frame.
        expected = _feature_shape(self._features, camera)
        for i, step in enumerate(steps):
            try:
                width, height = Image.open(io.BytesIO(step["observation"][camera])).size
            except Exception as e:  # PIL raises several types for unreadable headers
                raise BadRecordError(self.name, filename, record_index, f"step {i} {camera}: {e}") from e
            if (height, width) != tuple(expected[:2]):
                raise BadRecordError(
                    self.name,
                    filename,
                    record_index,
                    f"step {i} observation/{camera} is {height}x{width}, the feature spec says "
                    f"{expected[0]}x{expected[1]}",
                )

    def _diagnose(self, index: int, error: Exception) -> str:
        """Names the missing feature keys of a record that failed to decode, else the decode error."""
        try:
            example = tf_example_pb2.Example.FromString(self._reader[index])
        except Exception:  # the record is not even a valid proto: the original error says why
            return f"{type(error).__name__}: {error}"
        expected = tfds.core.utils.flatten_nest_dict(self._features.get_serialized_info())
        missing = sorted(set(expected) - set(example.features.feature))
        if missing:
            return f"missing feature keys {missing}"
        return f"{type(error).__name__}: {error}"

    def _read(self, index: int, filename: str, record_index: int) -> Episode:
        spec = self.spec
        cameras = [spec.primary_camera] + ([spec.wrist_camera] if spec.wrist_camera else [])
        cameras += [c for c in self.extra_cameras if c not in cameras]
        skip = {camera: tfds.decode.SkipDecoding() for camera in cameras}
        record = self._features.deserialize_example_np(self._reader[index], decoders={"steps": {"observation": skip}})
        steps = record["steps"]
        if len(steps) == 0:
            raise BadRecordError(self.name, filename, record_index, "episode has no steps")
        steps = [steps[i] for i in range(len(steps))]
        for i, step in enumerate(steps):
            for camera in cameras:
                if camera not in step["observation"]:
                    raise BadRecordError(self.name, filename, record_index, f"step {i}: missing observation/{camera}")
        actions = np.stack([spec.action(s) for s in steps]).astype(np.float32)
        dim = spec.layout().action_dim
        if actions.shape[1] != dim:
            raise BadRecordError(
                self.name, filename, record_index,
                f"actions have shape {actions.shape}, expected [L, {dim}] (embodiment {spec.embodiment!r})",
            )
        bad = np.argwhere(~np.isfinite(actions))
        if len(bad):
            raise BadRecordError(
                self.name,
                filename,
                record_index,
                f"non-finite action at step {bad[0][0]}, dimension {bad[0][1]}",
            )
        proprio = np.stack([spec.proprio(s) for s in steps]).astype(np.float32)
        if not np.all(np.isfinite(proprio)):
            raise BadRecordError(self.name, filename, record_index, "non-finite proprio")
        for camera in cameras:
            self._check_image_headers(steps, camera, filename, record_index)
        instruction = spec.instruction(steps[0])
        if isinstance(instruction, bytes):
            instruction = instruction.decode("utf-8")
        wrist = spec.wrist_camera
        return Episode(
            dataset=self.name,
            filename=filename,
            record_index=record_index,
            primary_images=[s["observation"][spec.primary_camera] for s in steps],
            wrist_images=[s["observation"][wrist] for s in steps] if wrist else None,
            image_shape=_feature_shape(self._features, spec.primary_camera),
            wrist_image_shape=_feature_shape(self._features, wrist),
            actions=actions,
            proprio=proprio,
            instruction=str(instruction),
            camera_images={c: [s["observation"][c] for s in steps] for c in cameras},
            camera_shapes={c: _feature_shape(self._features, c) for c in cameras},
        )
