"""Held-out episodes for offline evaluation: a deterministic per-dataset split by a hash of the episode index.

An episode is held out when a BLAKE2b hash of "<dataset>/<episode index>" falls below `eval_fraction` of the hash
range (crc32 would not do: being linear, it holds out the same indices in datasets whose names differ alike):
the same episodes whatever the process count, the shuffle seed or a resume, and never in the training stream.
"""

from __future__ import annotations

import hashlib

import numpy as np


def check_eval_fraction(fraction: float) -> float:
    """`fraction` if it is in [0, 1), else a ValueError naming data.eval_fraction."""
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.eval_fraction={fraction}; expected a share of the episodes in [0, 1)")
    return fraction


def held_out(name: str, num_episodes: int, fraction: float) -> np.ndarray:
    """Boolean [num_episodes]: True for the episodes of dataset `name` held out for evaluation."""
    fraction = check_eval_fraction(fraction)
    digest = lambda i: int.from_bytes(hashlib.blake2b(f"{name}/{i}".encode(), digest_size=8).digest(), "big")
    hashes = np.array([digest(i) for i in range(num_episodes)], np.float64)
    return hashes < fraction * 2.0**64


def split_episodes(name: str, num_episodes: int, fraction: float, *, evaluation: bool) -> np.ndarray:
    """Sorted episode indices of the training part (evaluation=False) or the held-out part (True)."""
    mask = held_out(name, num_episodes, fraction)
    indices = np.flatnonzero(mask if evaluation else ~mask)
    if fraction > 0 and not evaluation and len(indices) == 0:
        raise ValueError(f"data.eval_fraction={fraction} holds out all {num_episodes} episodes of {name!r}")
    return indices
