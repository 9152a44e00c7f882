"""Training times per modality: which distribution `config.diffusion` names for video and for actions, checked,
and one draw per (example, attention chunk)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from wamjax.diffusion import flow
from wamjax.diffusion.modes import action_prefix_settings


def time_sampling(diffusion: ml_collections.ConfigDict, modality: str) -> tuple[str, str]:
    """(distribution, config key) of `modality`'s ("video" | "action") training times.

    `diffusion.<modality>_time_sampling` when set, else the shared `diffusion.time_sampling`.
    """
    key = f"{modality}_time_sampling"
    own = str(diffusion.get(key, "") or "")
    if own:
        return own, f"diffusion.{key}"
    return str(diffusion.time_sampling), "diffusion.time_sampling"


def check_diffusion_config(diffusion: ml_collections.ConfigDict) -> None:
    """Raises naming the key on an unknown time distribution, bad Beta parameters or action-prefix settings."""
    for modality in ("video", "action"):
        flow.check_time_sampling(*time_sampling(diffusion, modality))
    for key in ("beta_a", "beta_b"):
        if float(diffusion.get(key, 1.0)) <= 0:
            raise ValueError(f"diffusion.{key}={diffusion.get(key)}; expected > 0")
    action_prefix_settings(diffusion)


def sample_chunk_times(
    example_rngs: jax.Array, chunk_ids: np.ndarray, diffusion: ml_collections.ConfigDict, modality: str = "video"
) -> jax.Array:
    """One flow time per (example, attention chunk), spread to the items of each chunk -> [B, len(chunk_ids)],
    drawn from `modality`'s distribution with one key per example."""
    num_chunks = int(chunk_ids.max()) + 1 if len(chunk_ids) else 1
    sampling, key = time_sampling(diffusion, modality)
    t = jax.vmap(lambda r: flow.sample_time(
        r, (num_chunks,), sampling, diffusion.shift, diffusion.logit_mean, diffusion.logit_std,
        float(diffusion.get("beta_a", 3.0)), float(diffusion.get("beta_b", 1.0)), key=key,
    ))(example_rngs)
    return t[:, chunk_ids]
