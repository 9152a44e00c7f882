"""Reads every episode of OXE datasets through the pipeline's own reader and prints a summary.

    python -m data_pipelines.inspect --data_dir=DIR [--datasets=a,b] [--skip_bad_records]

Run it on an OXE copy before a long job. Every shard is opened first: unreadable shards (truncated,
half-copied) are listed with dataset, file and reason. A dataset's records are then read until the
first bad one (named with dataset, file and record index). Any of these makes it exit non-zero, unless
`--skip_bad_records`: then they are counted in the summary, as training with data.skip_bad_records would.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from data_pipelines.clips import windowing
from data_pipelines.sources import episodes as episodes_lib
from data_pipelines.sources import lerobot
from data_pipelines.sources.episodes import EpisodeReader, open_episodes
from data_pipelines.sources.lerobot import LeRobotEpisode
from data_pipelines.sources.rlds import BadRecordError, count_bad_record, find_dataset_dir
from data_pipelines.sources.shards import BadShardError
from data_pipelines.standardize import registry

FLAGS = flags.FLAGS


def inspect_dataset(
    data_dir: str,
    name: str,
    split: str = "train",
    decode_frames: bool = True,
    *,
    skip_bad_records: bool = False,
    source: EpisodeReader | None = None,
    idle_threshold: float = 0.0,
) -> dict[str, Any]:
    """Summary of one dataset: episodes, steps, unique instructions, per-dimension action range.

    Raises `BadShardError` on an unreadable shard and `BadRecordError` on the first bad record, unless
    `skip_bad_records`: then both are counted (`bad_shards`, `bad_records`) and left out. With
    `decode_frames`, every primary and wrist frame is decoded too (slower; catches corrupt images in the
    middle of an episode). `source` reuses an already opened source of the dataset. With `idle_threshold` > 0
    the transitions where the robot stands still (`data.idle_filter`'s test on one step) are counted.
    """
    if source is None:
        cameras = _all_cameras(data_dir, name)
        source = open_episodes(data_dir, name, split, skip_bad_shards=skip_bad_records, cameras=cameras)
    steps, instructions, bad_records, idle = 0, set(), 0, 0
    layout = source.spec.layout()
    dim = source.spec.layout().action_dim
    low = np.full(dim, np.inf, np.float32)
    high = np.full(dim, -np.inf, np.float32)
    for index in range(len(source)):
        try:
            episode = source[index]
            if decode_frames and isinstance(episode, LeRobotEpisode):
                try:
                    for camera in source.cameras:
                        for i in range(len(episode)):
                            episode.decode_camera(camera, i, None)
                finally:
                    episode.close()
            elif decode_frames:
                for i in range(len(episode)):
                    episode.decode_frame(i, None)
                    if episode.has_wrist:
                        episode.decode_frame(i, None, wrist=True)
        except BadRecordError as e:
            if not skip_bad_records:
                raise
            count_bad_record(e)
            bad_records += 1
            continue
        steps += len(episode)
        if idle_threshold > 0:
            idle += sum(windowing.is_idle(episode, t, 1, idle_threshold, layout) for t in range(len(episode)))
        instructions.add(episode.instruction)
        low = np.minimum(low, episode.actions.min(0))
        high = np.maximum(high, episode.actions.max(0))
    return {
        "dataset": name,
        "embodiment": source.spec.embodiment,
        "episodes": len(source) - bad_records,
        "steps": steps,
        "unique_instructions": len(instructions),
        "action_min": low.tolist(),
        "action_max": high.tolist(),
        "bad_shards": [{"file": e.filename, "reason": e.reason} for e in source.bad_shards],
        "bad_records": bad_records,
        "idle_steps": idle if idle_threshold > 0 else None,
        "idle_threshold": idle_threshold,
    }


def _all_cameras(data_dir: str, name: str) -> tuple[str, ...]:
    """Every camera of a LeRobot dataset (all are checked); () for RLDS (primary and wrist)."""
    return tuple(episodes_lib.dataset_spec(data_dir, name).camera_keys()) if lerobot.is_lerobot(name) else ()


def available_datasets(data_dir: str) -> list[str]:
    """Registered datasets that have a TFDS folder under `data_dir`, and LeRobot datasets in its folders."""
    names = [
        lerobot.PREFIX + entry
        for entry in sorted(os.listdir(data_dir)) if os.path.exists(os.path.join(data_dir, entry, "meta", "info.json"))
    ] if os.path.isdir(data_dir) else []
    for name in registry.known_datasets():
        try:
            find_dataset_dir(data_dir, name)
        except FileNotFoundError:
            continue
        names.append(name)
    return names


def format_summary(summary: dict[str, Any]) -> str:
    """One readable block per dataset."""
    ranges = ", ".join(
        f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(summary["action_min"], summary["action_max"], strict=True)
    )
    text = (
        f"{summary['dataset']}: {summary['episodes']} episodes, {summary['steps']} steps, "
        f"{summary['unique_instructions']} unique instructions\n  action ranges ({summary['embodiment']}): {ranges}"
    )
    if summary.get("idle_steps") is not None:
        text += (f"\n  idle steps (every movement below {summary['idle_threshold']:g}, grippers unchanged): "
                 f"{summary['idle_steps']} of {summary['steps']}")
    if summary["bad_shards"] or summary["bad_records"]:
        text += (
            f"\n  skipped {len(summary['bad_shards'])} unreadable shards and {summary['bad_records']} bad records"
        )
    return text


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.data_dir:
        raise app.UsageError("--data_dir is required")
    data_dir = os.path.expanduser(FLAGS.data_dir)
    names = FLAGS.datasets or available_datasets(data_dir)
    if not names:
        print(
            f"No registered dataset found under {data_dir}; known: {registry.known_datasets()}",
            file=sys.stderr,
        )
        sys.exit(2)
    skip = FLAGS.skip_bad_records
    # Shards first, every dataset: a copy with several half-copied files is reported in one run.
    sources = {}
    for name in names:
        try:
            sources[name] = open_episodes(
                data_dir, name, FLAGS.split, skip_bad_shards=skip, cameras=_all_cameras(data_dir, name)
            )
        except BadShardError as e:
            print(f"ERROR: {e} (or pass --skip_bad_records)", file=sys.stderr, flush=True)
    if len(sources) < len(names):
        sys.exit(1)
    for name in names:
        try:
            summary = inspect_dataset(
                data_dir, name, FLAGS.split, FLAGS.decode_frames, skip_bad_records=skip, source=sources[name],
                idle_threshold=FLAGS.idle_threshold,
            )
        except BadRecordError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            sys.exit(1)
        print(format_summary(summary), flush=True)


if __name__ == "__main__":
    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_string("data_dir", None, "Root of the TFDS datasets: <data_dir>/<name>/<version>/.")
    flags.DEFINE_list("datasets", None, "Dataset names (default: every registered dataset found in data_dir).")
    flags.DEFINE_string("split", "train", "TFDS split to read.")
    flags.DEFINE_bool("decode_frames", True, "Decode every frame too, not only the image headers.")
    flags.DEFINE_bool("skip_bad_records", False, "Count unreadable shards and bad records instead of failing.")
    flags.DEFINE_float("idle_threshold", 0.0, "Count the steps where the robot stands still (data.idle_filter's "
                       "threshold); 0 skips the count.")
    app.run(main)
