"""Random access to LeRobot datasets (v2.1 and v3.0): parquet tables through pyarrow, mp4 frames through PyAV.

A dataset is a folder (local or any etils.epath URI) as the LeRobot library writes it:

    meta/info.json                  features, fps, robot_type, data_path / video_path templates, splits
    v3.0: meta/episodes/chunk-*/file-*.parquet   one row per episode: its data file, its frames' offset in
          each camera's video file (from_timestamp), its tasks
          meta/tasks.parquet, data/chunk-*/file-*.parquet (many episodes a file), videos/<camera>/chunk-*/...
    v2.1: meta/episodes.jsonl, meta/tasks.jsonl, data/chunk-*/episode_*.parquet (one episode a file),
          videos/chunk-*/<camera>/episode_*.mp4

`LeRobotSource` has the interface of the RLDS `EpisodeSource` (len, `source[i]` -> an episode with raw actions,
proprio, instruction and cameras decoded on demand), so clips, mixtures, held-out episodes, statistics and
inspection treat both alike. Frames are decoded only when a clip asks for them, at their timestamps, scaled by
FFmpeg to the size asked for. `read_episode` returns one episode as stored, for users and tests.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.sources.lerobot_meta import (  # noqa: F401  (re-exported: the format's public names)
    ACTION_KEY,
    CODEBASE_VERSIONS,
    PREFIX,
    STATE_KEY,
    EpisodeEntry,
    LeRobotFormatError,
    camera_features,
    dataset_root,
    dataset_spec,
    default_spec,
    episodes_v2,
    episodes_v3,
    is_lerobot,
    open_binary,
    read_info,
    read_tasks,
    split_episodes,
)
from data_pipelines.sources.rlds import BadRecordError
from data_pipelines.sources.shards import BadShardError

# LeRobot's own tolerance between a frame's parquet timestamp and the video frame decoded for it.
TOLERANCE_S = 1e-4
# Decoding on from the last frame is cheaper than seeking when the next frame asked for is this close.
_SEEK_AFTER_S = 2.0
_TABLE_CACHE = 4  # parquet tables kept per source (v3.0 files hold many episodes)


class _VideoStream:
    """Frames of one mp4 at given times, decoded forward from the nearest keyframe; asks in rising time order
    reuse the open decoder instead of seeking again."""

    def __init__(self, path: str, dataset: str, data_file: str, episode: int):
        self.path, self.dataset, self.data_file, self.episode = path, dataset, data_file, episode
        self._container: Any = None
        self._frames: Any = None
        self._previous: Any = None  # the last frame decoded
        self._last: tuple[float, tuple[int, int] | None, np.ndarray] | None = None

    def _error(self, reason: str) -> BadRecordError:
        return BadRecordError(self.dataset, self.path, self.episode, reason)

    def _open(self) -> Any:
        if self._container is None:
            try:
                self._container = av.open(open_binary(self.path))
                stream = self._container.streams.video[0]
            except Exception as e:  # noqa: BLE001  FFmpeg errors for missing, truncated or garbled files
                raise self._error(f"episode {self.episode}: cannot open the video ({type(e).__name__}: {e})") from e
            codec = stream.codec_context.name
            try:
                av.codec.Codec(codec, "r")
            except Exception as e:  # noqa: BLE001
                raise self._error(f"episode {self.episode}: PyAV {av.__version__} cannot decode codec {codec!r}") from e
            stream.thread_type = "AUTO"
        return self._container

    def _seek(self, time: float) -> None:
        container = self._open()
        stream = container.streams.video[0]
        container.seek(max(int(time / stream.time_base), 0), stream=stream, backward=True, any_frame=False)
        self._frames = container.decode(stream)
        self._previous = None

    def frame(self, time: float, size: tuple[int, int] | None, step: int = -1) -> np.ndarray:
        """The frame shown at `time` (seconds into the file; the episode's `step`), uint8 [H, W, 3], scaled to
        `size` (H, W)."""
        if self._last is not None and abs(self._last[0] - time) < TOLERANCE_S and self._last[1] == size:
            return self._last[2]
        previous = self._previous
        if self._frames is None or previous is None or not (
            float(previous.time) - TOLERANCE_S <= time < float(previous.time) + _SEEK_AFTER_S
        ):
            self._seek(time)
            previous = None
        chosen = None
        try:
            for frame in self._frames:
                if frame.time is None:
                    continue
                if float(frame.time) >= time - TOLERANCE_S:
                    candidates = [f for f in (previous, frame) if f is not None]
                    chosen = min(candidates, key=lambda f: abs(float(f.time) - time))
                    self._previous = frame
                    break
                previous = frame
        except Exception as e:  # noqa: BLE001  a truncated or corrupt stream fails mid-decode
            raise self._error(
                f"episode {self.episode} step {step}: decoding the frame at {time:.4f} s: {type(e).__name__}: {e}"
            ) from e
        if chosen is None:  # the stream ended first: the last frame is the only candidate left
            chosen, self._previous = previous, None
            self._frames = None
        if chosen is None or abs(float(chosen.time) - time) > TOLERANCE_S:
            shown = "none" if chosen is None else f"{float(chosen.time):.4f} s"
            raise self._error(
                f"episode {self.episode} step {step}: its timestamp asks for the frame at {time:.4f} s; the nearest "
                f"frame in the video is at {shown} (beyond LeRobot's tolerance of {TOLERANCE_S} s: timestamp outside "
                f"the video, or the video is truncated)"
            )
        if size is None:
            array = chosen.to_ndarray(format="rgb24")
        else:
            array = chosen.reformat(width=int(size[1]), height=int(size[0]), format="rgb24").to_ndarray()
        self._last = (time, size, array)
        return array

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = self._frames = self._previous = self._last = None


@dataclasses.dataclass
class LeRobotEpisode:
    """One standardized LeRobot episode; frames are decoded on demand (`decode_frame`, `decode_camera`)."""

    dataset: str
    filename: str  # the data parquet file
    record_index: int  # the episode index
    root: str
    actions: np.ndarray  # float32 [L, 7], raw
    proprio: np.ndarray  # float32 [L, p], raw
    instruction: str
    timestamps: np.ndarray  # float64 [L], seconds since the episode's first frame
    primary_camera: str
    wrist_camera: str | None
    videos: dict[str, tuple[str, float]]
    images: dict[str, list[bytes]]  # cameras of dtype image: encoded PNG/JPEG per step
    _streams: dict[str, _VideoStream] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def has_wrist(self) -> bool:
        """Whether the dataset's layout names a wrist camera."""
        return self.wrist_camera is not None

    def decode_frame(self, index: int, size: tuple[int, int] | None, wrist: bool = False) -> np.ndarray:
        """Frame `index` of the primary (or wrist) camera, uint8 [H, W, 3], scaled to `size`."""
        camera = self.wrist_camera if wrist else self.primary_camera
        if camera is None:
            raise ValueError(f"dataset {self.dataset!r} has no wrist camera in its layout")
        return self.decode_camera(camera, index, size)

    def decode_camera(self, camera: str, index: int, size: tuple[int, int] | None) -> np.ndarray:
        """Frame `index` of camera `camera` (a feature key), uint8 [H, W, 3], scaled to `size`."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.dataset} episode {self.record_index}: step {index} of {len(self)}")
        if camera in self.images:
            return _decode_image(self.images[camera][index], size, self, camera, index)
        if camera not in self.videos:
            raise KeyError(f"{self.dataset}: camera {camera!r} was not read; read: {sorted(self.videos)}")
        stream = self._streams.get(camera)
        if stream is None:
            file, offset = self.videos[camera]
            stream = self._streams[camera] = _VideoStream(
                os.path.join(self.root, file), self.dataset, self.filename, self.record_index
            )
        return stream.frame(self.videos[camera][1] + float(self.timestamps[index]), size, index)

    def close(self) -> None:
        """Closes the video files this episode opened."""
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()


def _decode_image(
    data: Any, size: tuple[int, int] | None, episode: LeRobotEpisode, camera: str, index: int
) -> np.ndarray:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data["bytes"] if isinstance(data, dict) else data)).convert("RGB")
    except Exception as e:  # noqa: BLE001  PIL raises several types for garbled data
        raise BadRecordError(episode.dataset, episode.filename, episode.record_index,
                             f"{camera} step {index}: {e}") from e
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image)


def _column_values(column: Any, image: bool) -> Any:
    """One parquet column as numpy ([L] scalars, [L, D] fixed-length vectors) without a detour through Python
    objects; image structs (and nested lists) as Python values."""
    data = column.combine_chunks()
    if image:
        return data.to_pylist()
    if pa.types.is_list(data.type) or pa.types.is_fixed_size_list(data.type):
        if pa.types.is_list(data.type.value_type) or pa.types.is_fixed_size_list(data.type.value_type):
            return np.asarray(data.to_pylist())
        flat = data.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(data), -1) if len(data) else flat.reshape(0, 0)
    return data.to_numpy(zero_copy_only=False)


class LeRobotSource:
    """Random-access standardized episodes of the LeRobot dataset entry `name` (`lerobot:<path>`), one split.

    Picklable (Grain workers reopen files lazily); `source[i]` returns a `LeRobotEpisode` or raises
    `BadRecordError` naming the file and episode index. Data files that cannot be opened raise `BadShardError`,
    or with `skip_bad_shards` are left out with their episodes (`bad_shards`).
    """

    def __init__(
        self, data_dir: str, name: str, split: str = "train", *, skip_bad_shards: bool = False,
        cameras: Sequence[str] = (),
    ):
        self.name = name
        self.dataset_dir = self.root = dataset_root(data_dir, name)
        self.split = split
        self.info = read_info(self.root)
        self.spec = dataset_spec(self.root, name)
        self.fps = float(self.info["fps"])
        wrist = [self.spec.wrist_camera] if self.spec.wrist_camera else []
        self.cameras = tuple(dict.fromkeys([self.spec.primary_camera, *wrist, *cameras]))
        for camera in self.cameras:
            feature = self.info["features"].get(camera)
            if feature is None:
                raise LeRobotFormatError(f"LeRobot dataset {name!r} at {self.root}: no camera feature {camera!r}; "
                                         f"its cameras are {camera_features(self.info)}")
            codec = (feature.get("info") or {}).get("video.codec")
            if feature["dtype"] == "video" and codec:
                try:
                    av.codec.Codec(codec, "r")
                except Exception as e:  # noqa: BLE001
                    raise LeRobotFormatError(
                        f"LeRobot dataset {name!r} at {self.root}: camera {camera!r} is encoded as {codec!r} "
                        f"(meta/info.json), which this PyAV build ({av.__version__}) cannot decode"
                    ) from e
        read = episodes_v3 if self.info["codebase_version"] == "v3.0" else episodes_v2
        entries = split_episodes(self.info, read(self.root, self.info, self.cameras), split, self.root)
        self.tasks = read_tasks(self.root, self.info)
        self.bad_shards: list[BadShardError] = []
        bad_files = set()
        for file in sorted({e.data_file for e in entries}):
            problem = self._file_problem(os.path.join(self.root, file))
            if problem:
                error = BadShardError(name, os.path.join(self.root, file), problem)
                if not skip_bad_shards:
                    raise error
                self.bad_shards.append(error)
                bad_files.add(file)
        self.entries = [e for e in entries if e.data_file not in bad_files]
        self._tables: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _file_problem(path: str) -> str | None:
        try:
            pq.read_metadata(open_binary(path))
        except FileNotFoundError:
            return "the parquet file does not exist"
        except Exception as e:  # noqa: BLE001  pyarrow raises ArrowInvalid and OSError for truncated files
            return f"not a readable parquet file ({e})"
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"], state["_lock"], state["spec"] = OrderedDict(), None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self.spec = dataset_spec(self.root, self.name)

    def locate(self, index: int) -> tuple[str, int]:
        """(data file, episode index) of episode `index` of this split."""
        entry = self.entries[index]
        return os.path.join(self.root, entry.data_file), entry.episode_index

    def _table(self, file: str) -> Any:
        with self._lock:
            if file in self._tables:
                self._tables.move_to_end(file)
                return self._tables[file]
        columns = list(dict.fromkeys(["episode_index", "timestamp", "task_index", ACTION_KEY, STATE_KEY,
                                      *(c for c in self.cameras if self.info["features"][c]["dtype"] == "image"),
                                      *self._extra_columns()]))
        schema = pq.read_schema(open_binary(file))
        table = pq.read_table(open_binary(file), columns=[c for c in columns if c in schema.names])
        with self._lock:
            self._tables[file] = table
            while len(self._tables) > _TABLE_CACHE:
                self._tables.popitem(last=False)
        return table

    def _extra_columns(self) -> list[str]:
        return [k for k, f in self.info["features"].items() if f.get("dtype") not in ("video", "image")]

    def rows(self, index: int) -> dict[str, np.ndarray]:
        """The stored columns of episode `index`'s rows (numeric features as arrays [L, ...])."""
        entry = self.entries[index]
        file = os.path.join(self.root, entry.data_file)
        try:
            table = self._table(file)
            episodes = table.column("episode_index").to_numpy()
        except Exception as e:  # noqa: BLE001
            raise BadRecordError(self.name, file, entry.episode_index, f"reading the parquet file: {e}") from e
        (rows,) = np.nonzero(episodes == entry.episode_index)
        if len(rows) != entry.length:
            raise BadRecordError(
                self.name, file, entry.episode_index,
                f"the parquet file holds {len(rows)} rows of episode {entry.episode_index}; the episode index "
                f"(meta/) says {entry.length}",
            )
        part = table.take(rows)
        out = {}
        for column in part.column_names:
            feature = self.info["features"].get(column, {})
            out[column] = _column_values(part.column(column), feature.get("dtype") == "image")
        return out

    def __getitem__(self, index: int) -> LeRobotEpisode:
        if not 0 <= index < len(self):
            raise IndexError(f"Dataset {self.name!r}: episode {index} out of range [0, {len(self)})")
        entry = self.entries[index]
        file = os.path.join(self.root, entry.data_file)
        columns = self.rows(index)
        try:
            return self._standardize(entry, file, columns)
        except BadRecordError:
            raise
        except Exception as e:  # noqa: BLE001  a layout function failing on this episode's values
            raise BadRecordError(self.name, file, entry.episode_index, f"{type(e).__name__}: {e}") from e

    def _standardize(self, entry: EpisodeEntry, file: str, columns: dict[str, Any]) -> LeRobotEpisode:
        spec = self.spec
        length = entry.length
        if length == 0:
            raise BadRecordError(self.name, file, entry.episode_index, "episode has no frames")
        task_index = columns.get("task_index")
        task = self.tasks.get(int(task_index[0])) if task_index is not None else None
        task = task if task is not None else (entry.tasks[0] if entry.tasks else "")
        numeric = {k: v for k, v in columns.items() if isinstance(v, np.ndarray)}
        steps = [{**{k: v[i] for k, v in numeric.items()}, "task": task} for i in range(length)]
        actions = np.stack([np.asarray(spec.action(s), np.float32).reshape(-1) for s in steps])
        dim = spec.layout().action_dim
        if actions.shape[1] != dim:
            raise BadRecordError(
                self.name, file, entry.episode_index,
                f"actions have shape {actions.shape}, expected [L, {dim}] (embodiment {spec.embodiment!r}); "
                f"register a layout for this dataset whose embodiment matches its "
                f"{self.info['features'].get(ACTION_KEY, {}).get('names')}",
            )
        bad = np.argwhere(~np.isfinite(actions))
        if len(bad):
            raise BadRecordError(self.name, file, entry.episode_index,
                                 f"non-finite action at step {bad[0][0]}, dimension {bad[0][1]}")
        proprio = np.stack([np.asarray(spec.proprio(s), np.float32).reshape(-1) for s in steps])
        if not np.all(np.isfinite(proprio)):
            raise BadRecordError(self.name, file, entry.episode_index, "non-finite proprio")
        timestamps = np.asarray(columns["timestamp"], np.float64).reshape(-1)
        images = {c: columns[c] for c in self.cameras if self.info["features"][c]["dtype"] == "image"}
        return LeRobotEpisode(
            dataset=self.name,
            filename=file,
            record_index=entry.episode_index,
            root=self.root,
            actions=actions,
            proprio=proprio,
            instruction=str(spec.instruction(steps[0])),
            timestamps=timestamps,
            primary_camera=spec.primary_camera,
            wrist_camera=spec.wrist_camera,
            videos={c: v for c, v in entry.videos.items() if c in self.cameras},
            images=images,
        )


def read_episode(root: str, episode_index: int) -> dict[str, Any]:
    """Episode `episode_index` of the LeRobot dataset at `root`, as stored (before standardization):
    `images` (camera -> uint8 [T, H, W, 3]), `state` float [T, S], `action` float [T, A], `instruction` str,
    `timestamp` float [T]."""
    info = read_info(root)
    source = LeRobotSource("", PREFIX + root, split=next(iter(info.get("splits") or {"train": ""})),
                           cameras=camera_features(info))
    positions = {e.episode_index: i for i, e in enumerate(source.entries)}
    if episode_index not in positions:
        raise IndexError(f"LeRobot dataset at {root} has no episode {episode_index}; it has {sorted(positions)}")
    index = positions[episode_index]
    columns = source.rows(index)
    entry = source.entries[index]
    holder = LeRobotEpisode(
        dataset=source.name, filename=source.locate(index)[0], record_index=episode_index, root=source.root,
        actions=np.zeros((entry.length, 0), np.float32), proprio=np.zeros((entry.length, 0), np.float32),
        instruction="", timestamps=np.asarray(columns["timestamp"], np.float64).reshape(-1),
        primary_camera=source.cameras[0], wrist_camera=None, videos=dict(entry.videos),
        images={c: columns[c] for c in source.cameras if info["features"][c]["dtype"] == "image"},
    )
    try:
        images = {c: np.stack([holder.decode_camera(c, i, None) for i in range(entry.length)]) for c in source.cameras}
    finally:
        holder.close()
    task_index = columns.get("task_index")
    instruction = source.tasks.get(int(task_index[0]), "") if task_index is not None else ""
    return {
        "images": images,
        "state": np.asarray(columns[STATE_KEY], np.float32) if STATE_KEY in columns else None,
        "action": np.asarray(columns[ACTION_KEY], np.float32),
        "instruction": instruction or (entry.tasks[0] if entry.tasks else ""),
        "timestamp": np.asarray(columns["timestamp"], np.float64).reshape(-1),
    }
