"""Reads every episode of OXE datasets through the pipeline's own reader and prints a summary.

    python -m data_pipelines.inspect --data_dir=DIR [--datasets=a,b]

Run it on an OXE copy before a long job: it exits non-zero on the first bad record, naming the
dataset, file and record index.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from data_pipelines import registry
from data_pipelines.rlds_source import BadRecordError, EpisodeSource, find_dataset_dir

FLAGS = flags.FLAGS


def inspect_dataset(data_dir: str, name: str, split: str = "train", decode_frames: bool = True) -> dict[str, Any]:
    """Summary of one dataset: episodes, steps, unique instructions, per-dimension action range.

    Raises `BadRecordError` on the first bad record. With `decode_frames`, every primary and wrist frame
    is decoded too (slower; catches corrupt images in the middle of an episode).
    """
    source = EpisodeSource(data_dir, name, split)
    steps, instructions = 0, set()
    low = np.full(registry.ACTION_DIM, np.inf, np.float32)
    high = np.full(registry.ACTION_DIM, -np.inf, np.float32)
    for index in range(len(source)):
        episode = source[index]
        if decode_frames:
            for i in range(len(episode)):
                episode.decode_frame(i, None)
                if episode.wrist_images is not None:
                    episode.decode_frame(i, None, wrist=True)
        steps += len(episode)
        instructions.add(episode.instruction)
        low = np.minimum(low, episode.actions.min(0))
        high = np.maximum(high, episode.actions.max(0))
    return {
        "dataset": name,
        "episodes": len(source),
        "steps": steps,
        "unique_instructions": len(instructions),
        "action_min": low.tolist(),
        "action_max": high.tolist(),
    }


def available_datasets(data_dir: str) -> list[str]:
    """Registered datasets that have a TFDS folder under `data_dir`."""
    names = []
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
    return (
        f"{summary['dataset']}: {summary['episodes']} episodes, {summary['steps']} steps, "
        f"{summary['unique_instructions']} unique instructions\n  action ranges (xyz, rpy, gripper): {ranges}"
    )


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
    for name in names:
        try:
            summary = inspect_dataset(data_dir, name, FLAGS.split, decode_frames=FLAGS.decode_frames)
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
    app.run(main)
