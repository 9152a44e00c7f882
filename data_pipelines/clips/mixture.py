"""Weighted mixtures of per-example sources on Grain's dataset API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain


def mixture_weights(
    names: Sequence[str], weights: Sequence[float], balance: bool, stats: dict[str, Any] | None = None
) -> list[float]:
    """Normalized sampling weights of `names`; `balance` multiplies them by each dataset's transitions."""
    weights = list(weights) if weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"data.weights has {len(weights)} entries for {len(names)} datasets {list(names)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.weights must be non-negative with a positive sum, got {weights}")
    if balance:
        if stats is None:
            raise ValueError("balance_weights needs normalization stats (they hold num_transitions)")
        missing = [n for n in names if n not in stats["datasets"]]
        if missing:
            raise KeyError(f"No stats for {missing} to balance weights with; stats have {sorted(stats['datasets'])}")
        weights = [w * stats["datasets"][n]["num_transitions"] for w, n in zip(weights, names, strict=True)]
    total = float(sum(weights))
    return [w / total for w in weights]


def mix_sources(sources: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
    """Interleaves `sources` so that each appears in proportion to its weight.

    Sources should be infinite (`.repeat()`): the mixture ends when its first source runs out. Any
    source producing per-example dicts of the batch contract can be mixed (e.g. captioned video).
    """
    if len(sources) != len(weights):
        raise ValueError(f"mix_sources got {len(sources)} sources but {len(weights)} weights")
    keep = [(s, w) for s, w in zip(sources, weights, strict=True) if w > 0]
    if not keep:
        raise ValueError(f"mix_sources needs at least one positive weight, got {list(weights)}")
    if len(keep) == 1:
        return keep[0][0]
    return grain.MapDataset.mix([s for s, _ in keep], [w for _, w in keep])
