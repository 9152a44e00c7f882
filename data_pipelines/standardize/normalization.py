"""Action/proprio (un)normalization with per-dataset statistics: numpy only, shared by the input pipeline and
the policy (which must not import the data readers)."""

from __future__ import annotations

from typing import Any

import numpy as np


def normalize(values: np.ndarray, group_stats: dict[str, list[Any]], method: str) -> np.ndarray:
    """Normalizes the masked dimensions of `values` [..., D] ("bounds", alias "quantile": q01/q99 -> [-1, 1];
    "normal")."""
    mask = np.asarray(group_stats["mask"], bool)
    if method in ("bounds", "quantile"):
        low, high = np.asarray(group_stats["q01"]), np.asarray(group_stats["q99"])
        scaled = np.clip(2.0 * (values - low) / np.maximum(high - low, 1e-8) - 1.0, -1.0, 1.0)
    elif method == "normal":
        scaled = (values - np.asarray(group_stats["mean"])) / np.maximum(np.asarray(group_stats["std"]), 1e-8)
    else:
        raise ValueError(f"Unknown action_normalization {method!r}; expected 'bounds' (alias 'quantile') or 'normal'")
    return np.where(mask, scaled, values).astype(np.float32)


def unnormalize(values: np.ndarray, group_stats: dict[str, list[Any]], method: str) -> np.ndarray:
    """Inverse of `normalize` on its masked dimensions (unmasked ones pass through).

    "bounds" maps [-1, 1] back to [q01, q99]; "normal" multiplies by std and adds the mean.
    """
    values = np.asarray(values, np.float32)
    mask = np.asarray(group_stats["mask"], bool)
    if mask.shape[-1] != values.shape[-1]:
        raise ValueError(f"stats cover {mask.shape[-1]} dims; values have shape {values.shape}")
    if method in ("bounds", "quantile"):
        low, high = np.asarray(group_stats["q01"]), np.asarray(group_stats["q99"])
        raw = (np.clip(values, -1.0, 1.0) + 1.0) / 2.0 * np.maximum(high - low, 1e-8) + low
    elif method == "normal":
        raw = values * np.maximum(np.asarray(group_stats["std"]), 1e-8) + np.asarray(group_stats["mean"])
    else:
        raise ValueError(f"Unknown action_normalization {method!r}; expected 'bounds' (alias 'quantile') or 'normal'")
    return np.where(mask, raw, values).astype(np.float32)
