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

from data_pipelines import registry
from data_pipelines.rlds_source import BadRecordError, EpisodeSource, count_bad_record

FORMAT_VERSION = 1
_STAT_KEYS = ("mean", "std", "q01", "q99", "min", "max")


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
    source: EpisodeSource,
    proprio_dim: int = 8,
    skip_bad_records: bool = False,
    max_episodes: int | None = None,
) -> dict[str, Any]:
    """Statistics of one dataset over (up to `max_episodes` of) its episodes."""
    actions, proprios = [], []
    native_dim = 0
    count = len(source) if max_episodes is None else min(len(source), max_episodes)
    for index in range(count):
        try:
            episode = source[index]
        except BadRecordError as e:
            if not skip_bad_records:
                raise
            count_bad_record(e)
            continue
        actions.append(episode.actions)
        native_dim = episode.proprio.shape[-1]
        proprios.append(_pad(episode.proprio, proprio_dim, source.name))
    if not actions:
        raise ValueError(f"Dataset {source.name!r}: no readable episodes to compute statistics from")
    spec = source.spec
    proprio_mask = (list(spec.proprio_mask or ()) + [True] * proprio_dim)[:proprio_dim]
    # Padding dimensions are constant zeros: keep them out of normalization.
    proprio_mask = [m and i < native_dim for i, m in enumerate(proprio_mask)]
    all_actions = np.concatenate(actions)
    return {
        "action": _summary(all_actions, spec.action_mask),
        "proprio": _summary(np.concatenate(proprios), proprio_mask),
        "num_episodes": len(actions),
        "num_transitions": int(len(all_actions)),
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
) -> dict[str, Any]:
    """Statistics of each dataset in `datasets` under `data_dir`, in the JSON layout of this module."""
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, "proprio_dim": proprio_dim, "datasets": {}}
    for name in datasets:
        source = EpisodeSource(data_dir, name, split, skip_bad_shards=skip_bad_records)
        out["datasets"][name] = dataset_stats(source, proprio_dim, skip_bad_records, max_episodes)
        logging.info("Statistics of %s: %d episodes", name, out["datasets"][name]["num_episodes"])
    return out


def save_stats(stats: dict[str, Any], path: str) -> None:
    """Writes `stats` as JSON to `path` (creating its directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(stats, f, indent=1)


def load_stats(path: str) -> dict[str, Any]:
    """Reads statistics written by `save_stats`, checking their layout."""
    with open(path) as f:
        stats = json.load(f)
    if stats.get("format_version") != FORMAT_VERSION or "datasets" not in stats:
        raise ValueError(f"{path}: not a normalization stats file of format_version {FORMAT_VERSION}")
    for name, entry in stats["datasets"].items():
        for group, dim in (("action", registry.ACTION_DIM), ("proprio", stats["proprio_dim"])):
            for key in (*_STAT_KEYS, "mask"):
                if len(entry[group][key]) != dim:
                    raise ValueError(
                        f"{path}: {name}/{group}/{key} has {len(entry[group][key])} values, expected {dim}"
                    )
    return stats


def normalize(values: np.ndarray, group_stats: dict[str, list[Any]], method: str) -> np.ndarray:
    """Normalizes the masked dimensions of `values` [..., D] ("bounds": q01/q99 -> [-1, 1]; "normal")."""
    mask = np.asarray(group_stats["mask"], bool)
    if method == "bounds":
        low, high = np.asarray(group_stats["q01"]), np.asarray(group_stats["q99"])
        scaled = np.clip(2.0 * (values - low) / np.maximum(high - low, 1e-8) - 1.0, -1.0, 1.0)
    elif method == "normal":
        scaled = (values - np.asarray(group_stats["mean"])) / np.maximum(np.asarray(group_stats["std"]), 1e-8)
    else:
        raise ValueError(f"Unknown action_normalization {method!r}; expected 'bounds' or 'normal'")
    return np.where(mask, scaled, values).astype(np.float32)


def unnormalize(values: np.ndarray, group_stats: dict[str, list[Any]], method: str) -> np.ndarray:
    """Inverse of `normalize` on its masked dimensions (unmasked ones pass through).

    "bounds" maps [-1, 1] back to [q01, q99]; "normal" multiplies by std and adds the mean.
    """
    values = np.asarray(values, np.float32)
    mask = np.asarray(group_stats["mask"], bool)
    if mask.shape[-1] != values.shape[-1]:
        raise ValueError(f"stats cover {mask.shape[-1]} dims; values have shape {values.shape}")
    if method == "bounds":
        low, high = np.asarray(group_stats["q01"]), np.asarray(group_stats["q99"])
        raw = (np.clip(values, -1.0, 1.0) + 1.0) / 2.0 * np.maximum(high - low, 1e-8) + low
    elif method == "normal":
        raw = values * np.maximum(np.asarray(group_stats["std"]), 1e-8) + np.asarray(group_stats["mean"])
    else:
        raise ValueError(f"Unknown action_normalization {method!r}; expected 'bounds' or 'normal'")
    return np.where(mask, raw, values).astype(np.float32)
