"""Per-dataset normalization statistics of actions and proprio, stored as JSON.

The layout is the same for one dataset and for a mixture: `{"datasets": {name: entry}}`, where each
entry holds `action` (7 dims) and `proprio` (data.proprio_dim dims, zero-padded) statistics with a
`mask` saying which dimensions are normalized (the gripper is left alone).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from data_pipelines.sources.episodes import EpisodeReader, open_episodes
from data_pipelines.sources.rlds import BadRecordError, count_bad_record
from data_pipelines.standardize.normalization import normalize, unnormalize
from wamjax.paths import as_path

FORMAT_VERSION = 1
_STAT_KEYS = ("mean", "std", "q01", "q99", "min", "max")
__all__ = ["compute_stats", "dataset_stats", "load_stats", "normalize", "save_stats", "unnormalize"]


def _pad(values: np.ndarray, dim: int, name: str) -> np.ndarray:
    if values.shape[-1] > dim:
        raise ValueError(f"{name}: proprio has {values.shape[-1]} dims, more than data.proprio_dim={dim}")
    return np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, dim - values.shape[-1])])


def _summary(values: np.ndarray, mask: Sequence[bool]) -> dict[str, list[Any]]:
    summary = {
        "mean": values.mean(0),
        "std": values.std(0),
        "q01": np.quantile(values, 0.01, axis=0),
        "q99": np.quantile(values, 0.99, axis=0),
        "min": values.min(0),
        "max": values.max(0),
    }
    out: dict[str, list[Any]] = {k: [float(x) for x in v] for k, v in summary.items()}
    out["mask"] = [bool(m) for m in mask]
    return out


def dataset_stats(
    source: EpisodeReader,
    proprio_dim: int = 8,
    skip_bad_records: bool = False,
    max_episodes: int | None = None,
    relative_horizon: int = 16,
) -> dict[str, Any]:
    """Statistics of one dataset over (up to `max_episodes` of) its episodes, in its embodiment's action layout
    (relative dimensions over every chunk of `relative_horizon` steps, relative to the chunk's start state)."""
    layout = source.spec.layout()
    actions, proprios = [], []
    native_dim = transitions = 0
    count = len(source) if max_episodes is None else min(len(source), max_episodes)
    for index in range(count):
        try:
            episode = source[index]
        except BadRecordError as e:
            if not skip_bad_records:
                raise
            count_bad_record(e)
            continue
        actions.append(layout.statistics_samples(episode.actions, episode.proprio, relative_horizon))
        native_dim = episode.proprio.shape[-1]
        transitions += len(episode)
        proprios.append(_pad(episode.proprio, proprio_dim, source.name))
    if not actions:
        raise ValueError(f"Dataset {source.name!r}: no readable episodes to compute statistics from")
    spec = source.spec
    proprio_mask = (list(spec.proprio_mask or ()) + [True] * proprio_dim)[:proprio_dim]
    # Padding dimensions are constant zeros: keep them out of normalization.
    proprio_mask = [m and i < native_dim for i, m in enumerate(proprio_mask)]
    all_actions = np.concatenate(actions)
    return {
        "action": _summary(all_actions, spec.normalized_action_dims()),
        "embodiment": layout.name,
        "proprio": _summary(np.concatenate(proprios), proprio_mask),
        "num_episodes": len(actions),
        "num_transitions": int(transitions),
        "skipped_shards": [os.path.basename(e.filename) for e in source.bad_shards],
    }


def compute_stats(
    data_dir: str,
    datasets: Sequence[str],
    *,
    proprio_dim: int = 8,
    split: str = "train",
    skip_bad_records: bool = False,
    max_episodes: int | None = None,
    relative_horizon: int = 16,
) -> dict[str, Any]:
    """Statistics of each dataset in `datasets` under `data_dir`, in the JSON layout of this module."""
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, "proprio_dim": proprio_dim, "datasets": {}}
    for name in datasets:
        source = open_episodes(data_dir, name, split, skip_bad_shards=skip_bad_records)
        out["datasets"][name] = dataset_stats(source, proprio_dim, skip_bad_records, max_episodes, relative_horizon)
        logging.info("Statistics of %s: %d episodes", name, out["datasets"][name]["num_episodes"])
    return out


def save_stats(stats: dict[str, Any], path: str) -> None:
    """Writes `stats` as JSON to `path` (local or an etils.epath URI, creating its directory)."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=1))


def load_stats(path: str) -> dict[str, Any]:
    """Reads statistics written by `save_stats` (local or an etils.epath URI), checking their layout."""
    stats = json.loads(as_path(path).read_text())
    if stats.get("format_version") != FORMAT_VERSION or "datasets" not in stats:
        raise ValueError(f"{path}: not a normalization stats file of format_version {FORMAT_VERSION}")
    for name, entry in stats["datasets"].items():
        for group, dim in (("action", len(entry["action"]["mask"])), ("proprio", stats["proprio_dim"])):
            for key in (*_STAT_KEYS, "mask"):
                if len(entry[group][key]) != dim:
                    raise ValueError(
                        f"{path}: {name}/{group}/{key} has {len(entry[group][key])} values, expected {dim}"
                    )
    return stats
