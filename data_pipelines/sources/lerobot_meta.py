"""The metadata of a LeRobot dataset (v2.1 and v3.0): meta/info.json, the episode index, tasks and splits, and the
standardization its features map to. Pure reads of small files; frames and rows are `lerobot.py`'s."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from data_pipelines.standardize import registry
from wamjax.paths import as_path, is_uri

PREFIX = "lerobot:"
CODEBASE_VERSIONS = ("v2.0", "v2.1", "v3.0")
ACTION_KEY, STATE_KEY = "action", "observation.state"


class LeRobotFormatError(ValueError):
    """A LeRobot dataset whose metadata cannot be used; names the dataset, the file and the key."""


def is_lerobot(name: str) -> bool:
    """Whether a `data.datasets` entry names a LeRobot dataset (`lerobot:<path>`)."""
    return name.startswith(PREFIX)


def dataset_root(data_dir: str, name: str) -> str:
    """The folder of LeRobot dataset entry `lerobot:<path>`: `path` itself when absolute or a URI, else under
    `data_dir`."""
    path = name[len(PREFIX) :] if is_lerobot(name) else name
    if not path:
        raise ValueError(f"data.datasets entry {name!r} names no folder; write lerobot:/path/to/dataset")
    if is_uri(path) or os.path.isabs(os.path.expanduser(path)) or not data_dir:
        return os.path.expanduser(path)
    return os.path.join(data_dir, path)


def read_text(path: str) -> str:
    return as_path(path).read_text()


def open_binary(path: str) -> Any:
    """A local path as is (PyAV and pyarrow read it fastest), a URI as an open file object."""
    return path if not is_uri(path) else as_path(path).open("rb")


def path_exists(path: str) -> bool:
    return as_path(path).exists()


@functools.lru_cache(maxsize=64)
def read_info(root: str) -> dict[str, Any]:
    """`meta/info.json` of the dataset at `root`, its version checked."""
    path = os.path.join(root, "meta", "info.json")
    if not path_exists(path):
        raise FileNotFoundError(
            f"No LeRobot dataset at {root}: {path} does not exist (a LeRobot dataset folder holds meta/info.json, "
            f"data/ and videos/)"
        )
    info = json.loads(read_text(path))
    version = info.get("codebase_version")
    if version not in CODEBASE_VERSIONS:
        raise LeRobotFormatError(
            f"LeRobot dataset at {root}: {path} has codebase_version {version!r}; this reader supports "
            f"{list(CODEBASE_VERSIONS)}"
        )
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise LeRobotFormatError(f"LeRobot dataset at {root}: {path} lacks the key {key!r}")
    return info


def camera_features(info: dict[str, Any]) -> list[str]:
    """The dataset's cameras (features of dtype video or image), in the order info.json lists them."""
    return [k for k, f in info["features"].items() if f.get("dtype") in ("video", "image")]


def default_spec(info: dict[str, Any]) -> registry.DatasetSpec:
    """The standardization of a LeRobot dataset no layout is registered for: its `action` feature as the 7-D
    action (EEF delta xyz, rpy, gripper openness), `observation.state` as proprio, the episode's task as the
    instruction; the first camera whose name lacks "wrist" is the primary, the first with it the wrist."""
    cameras = tuple(camera_features(info))
    if not cameras:
        raise LeRobotFormatError("the dataset has no camera (no feature of dtype video or image) in meta/info.json")
    wrist = next((c for c in cameras if "wrist" in c), None)
    primary = next((c for c in cameras if c != wrist), cameras[0])
    return registry.DatasetSpec(
        primary_camera=primary,
        wrist_camera=wrist,
        cameras=cameras,
        action=lambda s: s[ACTION_KEY],
        proprio=lambda s: s[STATE_KEY],
        instruction=lambda s: s["task"],
    )


def dataset_spec(root: str, name: str | None = None) -> registry.DatasetSpec:
    """The standardization of the LeRobot dataset at `root`: a registered layout (`register_dataset` under its
    entry name `lerobot:<path>`, `lerobot:<folder name>` or `lerobot:robot_type=<robot_type>`), else
    `default_spec`. The keys it reads are checked against meta/info.json."""
    info = read_info(root)
    name = name or PREFIX + root
    folder = os.path.basename(os.path.normpath(root))
    candidates = [name, PREFIX + folder, f"{PREFIX}robot_type={info.get('robot_type')}"]
    spec = next((registry.registered(c) for c in candidates if registry.registered(c) is not None), None)
    features = info["features"]
    if spec is None:
        for key in (ACTION_KEY, STATE_KEY):
            if key not in features:
                raise LeRobotFormatError(
                    f"LeRobot dataset {name!r} at {root}: meta/info.json has no feature {key!r}, which the default "
                    f"layout reads (register a layout under {PREFIX + folder!r} to map other keys); its features: "
                    f"{sorted(features)}"
                )
        try:
            spec = default_spec(info)
        except LeRobotFormatError as e:
            raise LeRobotFormatError(f"LeRobot dataset {name!r} at {root}: {e}") from None
    for camera in spec.camera_keys():
        if camera not in features:
            raise LeRobotFormatError(
                f"LeRobot dataset {name!r} at {root}: meta/info.json has no camera feature {camera!r} (its layout's "
                f"camera); its cameras are {camera_features(info)}"
            )
    return spec


@dataclasses.dataclass(frozen=True)
class EpisodeEntry:
    """Where one episode's rows and frames are."""

    episode_index: int
    length: int
    data_file: str  # relative to the dataset root
    tasks: tuple[str, ...]
    videos: dict[str, tuple[str, float]]  # camera -> (video file relative to the root, its first frame's time)


def episodes_v3(root: str, info: dict[str, Any], cameras: Sequence[str]) -> list[EpisodeEntry]:
    meta = as_path(os.path.join(root, "meta", "episodes"))
    files = sorted(str(p) for p in meta.glob("chunk-*/file-*.parquet")) if meta.exists() else []
    if not files:
        raise LeRobotFormatError(f"LeRobot dataset at {root} (v3.0): no episode index under {meta}/chunk-*/")
    video_path = info.get("video_path")
    entries = []
    for file in files:
        columns = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index"]
        columns += [f"videos/{c}/{k}" for c in cameras if info["features"][c]["dtype"] == "video"
                    for k in ("chunk_index", "file_index", "from_timestamp")]
        try:
            table = pq.read_table(open_binary(file), columns=columns)
        except Exception as e:  # noqa: BLE001  pyarrow raises several types for a missing column or a bad file
            raise LeRobotFormatError(f"LeRobot dataset at {root}: episode index {file}: {e}") from e
        for row in table.to_pylist():
            videos = {}
            for c in cameras:
                if info["features"][c]["dtype"] != "video":
                    continue
                chunk, index = row[f"videos/{c}/chunk_index"], row[f"videos/{c}/file_index"]
                videos[c] = (video_path.format(video_key=c, chunk_index=chunk, file_index=index),
                             float(row[f"videos/{c}/from_timestamp"]))
            data_file = info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            entries.append(EpisodeEntry(int(row["episode_index"]), int(row["length"]), data_file,
                                        tuple(row["tasks"] or ()), videos))
    return entries


def episodes_v2(root: str, info: dict[str, Any], cameras: Sequence[str]) -> list[EpisodeEntry]:
    path = os.path.join(root, "meta", "episodes.jsonl")
    if not path_exists(path):
        raise LeRobotFormatError(f"LeRobot dataset at {root} ({info['codebase_version']}): {path} does not exist")
    chunks = int(info.get("chunks_size", 1000))
    entries = []
    for line in read_text(path).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        episode, chunk = int(row["episode_index"]), int(row["episode_index"]) // chunks
        videos = {
            c: (info["video_path"].format(episode_chunk=chunk, video_key=c, episode_index=episode), 0.0)
            for c in cameras
            if info["features"][c]["dtype"] == "video"
        }
        data_file = info["data_path"].format(episode_chunk=chunk, episode_index=episode)
        entries.append(EpisodeEntry(episode, int(row["length"]), data_file, tuple(row.get("tasks") or ()), videos))
    return entries


def read_tasks(root: str, info: dict[str, Any]) -> dict[int, str]:
    if info["codebase_version"] == "v3.0":
        rows = pq.read_table(open_binary(os.path.join(root, "meta", "tasks.parquet"))).to_pylist()
        # The LeRobot library stores the task string as the pandas index of this table.
        key = "task" if rows and "task" in rows[0] else "__index_level_0__"
        return {int(r["task_index"]): str(r[key]) for r in rows}
    path = os.path.join(root, "meta", "tasks.jsonl")
    rows = [json.loads(line) for line in read_text(path).splitlines() if line.strip()] if path_exists(path) else []
    return {int(r["task_index"]): str(r["task"]) for r in rows}


def split_episodes(info: dict[str, Any], entries: list[EpisodeEntry], split: str, root: str) -> list[EpisodeEntry]:
    """The episodes of `split` (info.json `splits`, "start:stop" episode indices), in episode order."""
    splits = info.get("splits") or {"train": f"0:{len(entries)}"}
    if split not in splits:
        raise KeyError(f"LeRobot dataset at {root} has no split {split!r}; has {sorted(splits)}")
    start, stop = (int(x) for x in str(splits[split]).split(":"))
    return sorted((e for e in entries if start <= e.episode_index < stop), key=lambda e: e.episode_index)
