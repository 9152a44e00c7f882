"""Writes small local LeRobot datasets (v3.0 or v2.1 layout): parquet through pyarrow, mp4 through PyAV.

    python -m data_pipelines.make_lerobot --out=DIR/lerobot_sim --episodes=8 [--version=v3.0] [--codec=h264]

The episodes render the same procedural scene as `make_oxe_like` (a top and a wrist camera), with the 7-D
end-effector action (delta xyz, delta rpy, gripper openness) and a 7-D state (pose, gripper), so a LeRobot
dataset and OXE datasets mix in one run. `write_dataset` writes any episodes given as arrays (tests use it to
make datasets with known frames). Videos are encoded as the LeRobot library does (yuv420p, a keyframe every
`gop` frames); v3.0 packs `episodes_per_file` episodes into each data and video file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags, logging

from data_pipelines.scenes import make_trajectory, render_frame

ENCODERS = {"h264": "libx264", "hevc": "libx265", "av1": "libsvtav1"}  # codec in info.json -> FFmpeg encoder
CAMERAS = ("observation.images.image", "observation.images.wrist_image")
_STAT_QUANTILES = {"q01": 0.01, "q10": 0.1, "q50": 0.5, "q90": 0.9, "q99": 0.99}


def _encode(path: str, frames: np.ndarray, fps: int, codec: str, gop: int, crf: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(ENCODERS[codec], rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop), "crf": str(crf)}
        if codec == "av1":
            stream.options["preset"] = "12"  # the fastest: these are test and demo files
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode())


def _stats(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    out = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0)}
    out.update({k: np.quantile(values, q, axis=0) for k, q in _STAT_QUANTILES.items()})
    result: dict[str, Any] = {k: [float(x) for x in v] for k, v in out.items()}
    result["count"] = [len(values)]
    return result


def _vector_feature(values: np.ndarray, names: Sequence[str] | None) -> dict[str, Any]:
    dim = int(values.shape[-1])
    return {"dtype": "float32", "shape": [dim], "names": list(names) if names else [f"dim_{i}" for i in range(dim)]}


def write_dataset(
    out: str,
    episodes: Sequence[dict[str, Any]],
    *,
    fps: int = 10,
    version: str = "v3.0",
    codec: str = "h264",
    robot_type: str = "synthetic",
    episodes_per_file: int = 4,
    gop: int = 2,
    crf: int = 18,
    action_names: Sequence[str] | None = None,
    state_names: Sequence[str] | None = None,
) -> None:
    """Writes `episodes` (dicts of `images` camera -> uint8 [T, H, W, 3], `state` [T, S], `action` [T, A],
    `task` str) as a LeRobot dataset at `out`."""
    if version not in ("v2.1", "v3.0"):
        raise ValueError(f"version={version!r}; expected 'v2.1' or 'v3.0'")
    if codec not in ENCODERS:
        raise ValueError(f"codec={codec!r}; expected one of {sorted(ENCODERS)}")
    if not episodes:
        raise ValueError("no episodes to write")
    cameras = list(episodes[0]["images"])
    tasks = list(dict.fromkeys(e["task"] for e in episodes))
    per_file = episodes_per_file if version == "v3.0" else 1
    files = [list(range(i, min(i + per_file, len(episodes)))) for i in range(0, len(episodes), per_file)]
    index = 0
    episode_rows, stats_rows = [], []
    for file_index, members in enumerate(files):
        tables, video_times = [], {c: 0.0 for c in cameras}
        frames = {c: [] for c in cameras}
        for e in members:
            episode = episodes[e]
            length = len(episode["action"])
            row = {"episode_index": e, "tasks": [episode["task"]], "length": length}
            if version == "v3.0":
                row.update({"data/chunk_index": 0, "data/file_index": file_index,
                            "dataset_from_index": index, "dataset_to_index": index + length})
                for c in cameras:
                    row.update({f"videos/{c}/chunk_index": 0, f"videos/{c}/file_index": file_index,
                                f"videos/{c}/from_timestamp": video_times[c],
                                f"videos/{c}/to_timestamp": video_times[c] + length / fps})
                    video_times[c] += length / fps
            for c in cameras:
                frames[c].append(np.asarray(episode["images"][c], np.uint8))
            tables.append(pa.table({
                "observation.state": pa.array(list(np.asarray(episode["state"], np.float32)),
                                              pa.list_(pa.float32())),
                "action": pa.array(list(np.asarray(episode["action"], np.float32)), pa.list_(pa.float32())),
                "timestamp": pa.array(np.arange(length, dtype=np.float32) / fps, pa.float32()),
                "frame_index": pa.array(np.arange(length), pa.int64()),
                "episode_index": pa.array(np.full(length, e), pa.int64()),
                "index": pa.array(index + np.arange(length), pa.int64()),
                "task_index": pa.array(np.full(length, tasks.index(episode["task"])), pa.int64()),
            }))
            index += length
            episode_rows.append(row)
            stats_rows.append({"observation.state": _stats(episode["state"]), "action": _stats(episode["action"])})
        if version == "v3.0":
            data_file = f"data/chunk-000/file-{file_index:03d}.parquet"
            videos = {c: f"videos/{c}/chunk-000/file-{file_index:03d}.mp4" for c in cameras}
        else:
            data_file = f"data/chunk-000/episode_{members[0]:06d}.parquet"
            videos = {c: f"videos/chunk-000/{c}/episode_{members[0]:06d}.mp4" for c in cameras}
        os.makedirs(os.path.join(out, os.path.dirname(data_file)), exist_ok=True)
        pq.write_table(pa.concat_tables(tables), os.path.join(out, data_file))
        for c in cameras:
            _encode(os.path.join(out, videos[c]), np.concatenate(frames[c]), fps, codec, gop, crf)

    first = episodes[0]
    features: dict[str, Any] = {}
    for c in cameras:
        _, height, width, channels = np.asarray(first["images"][c]).shape
        features[c] = {
            "dtype": "video", "shape": [height, width, channels], "names": ["height", "width", "channels"],
            "info": {"video.height": height, "video.width": width, "video.codec": codec,
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": channels, "has_audio": False},
        }
    features["observation.state"] = _vector_feature(np.asarray(first["state"]), state_names)
    features["action"] = _vector_feature(np.asarray(first["action"]), action_names)
    features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for key in ("frame_index", "episode_index", "index", "task_index"):
        features[key] = {"dtype": "int64", "shape": [1], "names": None}
    info = {
        "codebase_version": version, "robot_type": robot_type, "total_episodes": len(episodes),
        "total_frames": index, "total_tasks": len(tasks), "chunks_size": 1000, "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"}, "features": features,
    }
    meta = os.path.join(out, "meta")
    os.makedirs(meta, exist_ok=True)
    if version == "v3.0":
        info.update({"data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                     "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"})
        os.makedirs(os.path.join(meta, "episodes", "chunk-000"), exist_ok=True)
        index_file = os.path.join(meta, "episodes", "chunk-000", "file-000.parquet")
        pq.write_table(pa.Table.from_pylist(episode_rows), index_file)
        pq.write_table(pa.table({"task_index": list(range(len(tasks))), "task": tasks}),
                       os.path.join(meta, "tasks.parquet"))
    else:
        info.update({"total_chunks": 1, "total_videos": len(episodes) * len(cameras),
                     "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                     "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"})
        with open(os.path.join(meta, "episodes.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in episode_rows)
        with open(os.path.join(meta, "tasks.jsonl"), "w") as f:
            f.writelines(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
        with open(os.path.join(meta, "episodes_stats.jsonl"), "w") as f:
            f.writelines(json.dumps({"episode_index": i, "stats": s}) + "\n" for i, s in enumerate(stats_rows))
    all_stats = {
        key: _stats(np.concatenate([np.asarray(e[name], np.float32) for e in episodes]))
        for key, name in (("observation.state", "state"), ("action", "action"))
    }
    with open(os.path.join(meta, "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    with open(os.path.join(meta, "stats.json"), "w") as f:
        json.dump(all_stats, f, indent=4)


def synthetic_episodes(
    num_episodes: int, seed: int = 0, *, image_size: tuple[int, int] = (48, 64), min_steps: int = 20,
    max_steps: int = 40,
) -> list[dict[str, Any]]:
    """Episodes of the procedural scene as `write_dataset` takes them (two cameras, 7-D action and state)."""
    rng = np.random.default_rng([seed, 7])
    episodes = []
    for _ in range(num_episodes):
        traj = make_trajectory(rng, int(rng.integers(min_steps, max_steps + 1)))
        length = len(traj.gripper_open)
        images = {
            CAMERAS[0]: np.stack([render_frame(traj.eef_pose[i], traj.gripper_open[i], traj.scene_seed, image_size)
                                  for i in range(length)]),
            CAMERAS[1]: np.stack([render_frame(traj.eef_pose[i], traj.gripper_open[i], traj.scene_seed, image_size,
                                               wrist=True) for i in range(length)]),
        }
        state = np.concatenate([traj.eef_pose, traj.gripper_open[:, None]], -1).astype(np.float32)
        action = np.concatenate([traj.eef_delta, traj.gripper_open[:, None]], -1).astype(np.float32)
        episodes.append({"images": images, "state": state, "action": action, "task": traj.instruction})
    return episodes


ACTION_NAMES = ("delta_x", "delta_y", "delta_z", "delta_roll", "delta_pitch", "delta_yaw", "gripper_open")
STATE_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper_open")

FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    size = tuple(int(v) for v in FLAGS.image_size)
    if len(size) != 2:
        raise app.UsageError(f"--image_size={FLAGS.image_size}: give H,W")
    episodes = synthetic_episodes(FLAGS.episodes, FLAGS.seed, image_size=size)
    write_dataset(os.path.expanduser(FLAGS.out), episodes, fps=FLAGS.fps, version=FLAGS.version, codec=FLAGS.codec,
                  episodes_per_file=FLAGS.episodes_per_file, action_names=ACTION_NAMES, state_names=STATE_NAMES)
    logging.info("Wrote %d episodes", len(episodes))
    print(f"Wrote {len(episodes)} episodes ({FLAGS.version}, {FLAGS.codec}) to {FLAGS.out}")


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "Folder of the LeRobot dataset to write.")
    flags.DEFINE_integer("episodes", 8, "Episodes to write.")
    flags.DEFINE_integer("seed", 0, "Random seed of trajectories and scenes.")
    flags.DEFINE_list("image_size", ["48", "64"], "H,W of both cameras.")
    flags.DEFINE_integer("fps", 10, "Frames per second.")
    flags.DEFINE_enum("version", "v3.0", ["v3.0", "v2.1"], "LeRobot dataset layout.")
    flags.DEFINE_enum("codec", "h264", sorted(ENCODERS), "Video codec.")
    flags.DEFINE_integer("episodes_per_file", 4, "Episodes per data and video file (v3.0).")
    app.run(main)
