"""The three ways one world-action model acts, and the training draw that teaches them.

joint: video and actions denoised together (a policy). imagine_then_act: the future video is generated first,
then the actions are inferred with that video held clean (inverse dynamics on imagined video). world_model:
future frames generated given a clean action chunk. Training teaches the two conditional modes by drawing,
per example, a share where the video is clean (t_video = 0, actions noisy) and a share where the actions are
clean (t_action = 0, video noisy), as UVA and DreamZero do. A second, independent draw gives a share of the
examples a clean action prefix (the first k actions at t = 0, not in the loss): real-time chunking's training
variant, so that the model learns to continue a chunk whose start it did not choose.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

POLICY_MODES = ("joint", "imagine_then_act")  # modes that return actions from an observation
MODES = (*POLICY_MODES, "world_model")


def check_mode(mode: str, allowed: tuple[str, ...] = POLICY_MODES, name: str = "mode") -> str:
    """`mode` if it is one of `allowed`, else a ValueError naming it."""
    if mode not in allowed:
        raise ValueError(f"{name}={mode!r}; expected one of {list(allowed)}")
    return mode


def clean_probs(diffusion: ml_collections.ConfigDict) -> tuple[float, float]:
    """(clean_video_prob, clean_action_prob), checked; configs without the keys read as 0 (joint only)."""
    pv = float(diffusion.get("clean_video_prob", 0.0))
    pa = float(diffusion.get("clean_action_prob", 0.0))
    for key, p in (("diffusion.clean_video_prob", pv), ("diffusion.clean_action_prob", pa)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{key}={p}; expected a probability in [0, 1]")
    if pv + pa > 1.0:
        raise ValueError(
            f"diffusion.clean_video_prob + diffusion.clean_action_prob = {pv} + {pa} > 1; they are shares of "
            "the examples (the rest are joint), so they must sum to at most 1"
        )
    return pv, pa


CLEAN_DRAW_FOLD = 1  # folded into an example's key for its clean-modality draw


class CleanDraw(NamedTuple):
    """Per example [B] booleans: the video is clean (inverse dynamics) / the actions are clean (world model)."""

    video: jax.Array
    actions: jax.Array


def draw_clean_modalities(example_rngs: jax.Array, diffusion: ml_collections.ConfigDict) -> CleanDraw | None:
    """Which examples have a clean modality, from one key per example [B]; None when both shares are 0 (no
    draw, today's behaviour). The keys are folded with a constant of their own so the draw is independent of
    the times and noises drawn from the same keys."""
    pv, pa = clean_probs(diffusion)
    if pv == 0.0 and pa == 0.0:
        return None
    u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(r, CLEAN_DRAW_FOLD)))(example_rngs)
    return CleanDraw(video=u < pv, actions=(u >= pv) & (u < pv + pa))


PREFIX_DRAW_FOLD = 2  # folded into an example's key for its action-prefix draw


def action_prefix_settings(diffusion: ml_collections.ConfigDict) -> tuple[float, int]:
    """(action_prefix_prob, action_prefix_max), checked; configs without the keys read as (0, 0): no prefix."""
    p = float(diffusion.get("action_prefix_prob", 0.0))
    k = int(diffusion.get("action_prefix_max", 0))
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"diffusion.action_prefix_prob={p}; expected a probability in [0, 1]")
    if k < 0:
        raise ValueError(f"diffusion.action_prefix_max={k}; expected >= 0 (0: up to all but the last action)")
    return p, k


def draw_action_prefix(example_rngs: jax.Array, diffusion: ml_collections.ConfigDict,
                       num_actions: int) -> jax.Array | None:
    """[B, T_a] booleans: the actions each example gets clean as an already-chosen prefix; None when off.

    With probability `action_prefix_prob` an example's first k actions, k uniform in 1..K, where K is
    `action_prefix_max` (0: all but the last action) capped at T_a - 1, so some action is always a target.
    """
    p, k_max = action_prefix_settings(diffusion)
    if p == 0.0 or num_actions < 2:
        return None
    k_max = min(k_max or num_actions - 1, num_actions - 1)

    def one(rng: jax.Array) -> jax.Array:
        on_key, k_key = jax.random.split(jax.random.fold_in(rng, PREFIX_DRAW_FOLD))
        k = jax.random.randint(k_key, (), 1, k_max + 1)
        return (jax.random.uniform(on_key) < p) & (jnp.arange(num_actions) < k)

    return jax.vmap(one)(example_rngs)
