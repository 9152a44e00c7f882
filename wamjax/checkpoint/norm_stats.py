"""Whether a run's checkpoints must carry normalization statistics: the one place that says "synthetic, no stats".

A run on real data (RLDS datasets, a latents cache encoded from them, mixtures) trains on normalized actions
and states, so every consumer of its checkpoints (the policy, the server, closed-loop and offline evaluation,
export) needs the same statistics back. Only a run whose config says its data was synthetic has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SYNTHETIC_SOURCE = "synthetic"


class MissingNormStatsError(ValueError):
    """A checkpoint (or run) of real data without the normalization statistics it trained with."""


def trained_on_synthetic_data(run_config: Any) -> bool:
    """Whether the run's config says its data was synthetic (`data.source`), so it has no normalization stats."""
    data = run_config["data"]
    return str(data.get("source", "oxe")) == SYNTHETIC_SOURCE


def has_norm_stats(norm_stats: Mapping[str, Any] | None) -> bool:
    """Whether `norm_stats` holds at least one dataset's statistics."""
    return bool((norm_stats or {}).get("datasets"))


def checked_norm_stats(run_config: Any, norm_stats: Mapping[str, Any] | None, *, where: str) -> dict[str, Any]:
    """`norm_stats` when they suit the run: {} only where the run's config says its data was synthetic.

    Raises `MissingNormStatsError` naming `where` (e.g. the checkpoint) and the missing item otherwise.
    """
    if has_norm_stats(norm_stats):
        return dict(norm_stats or {})
    if trained_on_synthetic_data(run_config):
        return {}
    data = run_config["data"]
    cache = data.get("latents_cache", "")
    origin = f"data.source={data.get('source', 'oxe')!r}" + (f", data.latents_cache={cache!r}" if cache else "")
    raise MissingNormStatsError(
        f"{where} has no normalization stats (its 'norm_stats' item is empty), but its run trained on real data "
        f"({origin}, data.datasets={data.get('datasets')!r}): its actions and states are normalized, and without "
        "the stats it would act in the wrong units. Retrain with data.stats_path set (every checkpoint of a run "
        "on real data saves its stats), or use a checkpoint that has them."
    )
