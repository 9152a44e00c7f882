"""The three ways one world-action model acts, and the training draw that teaches them.

joint: video and actions denoised together (a policy). imagine_then_act: the future video is generated first,
then the actions are inferred with that video held clean (inverse dynamics on imagined video). world_model:
future frames generated given a clean action chunk. Training teaches the two conditional modes by drawing,
per example, a share where the video is clean (t_video = 0, actions noisy) and a share where the actions are
clean (t_action = 0, video noisy), as UVA and DreamZero do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
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
