"""WorldActionModel: the Wan video DiT over [video tokens | action tokens | proprio token | padding].

Mode is data: without `actions` the model is exactly the Wan video backbone (mode `video`); with them
(mode `joint`) action and proprio tokens join the same sequence with their own noise level. Timesteps are
on Wan's 0..1000 scale: t_video is [B] or per latent frame [B, F]; t_action is [B] or per action token.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wamjax.models.actions import ActionTokens
from wamjax.models.config import ModelConfig
from wamjax.models.dit import (
    BlockStack,
    ConditionEmbedder,
    PatchEmbed,
    make_token_layout,
    modulate_per_group,
    unpatchify,
)
from wamjax.models.layers import Dense, LayerNorm, constrain

Params = Any


class WamOutput(NamedTuple):
    """Predicted velocities: video [B, F, H, W, C] and actions [B, T_a, action_dim] (None in video mode)."""

    video: jax.Array
    actions: jax.Array | None


def _per_group(t: jax.Array, batch: int, count: int, name: str) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.full((batch,), t)
    if t.ndim == 1:
        return jnp.broadcast_to(t[:, None], (batch, count))
    if t.shape != (batch, count):
        raise ValueError(f"{name} has shape {t.shape}; expected ({batch},) or ({batch}, {count})")
    return t


class WorldActionModel(nn.Module):
    """Joint video + action denoiser on a Wan-2.1-compatible transformer."""

    cfg: ModelConfig
    pad_to_multiple: int = 1

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        t_video: jax.Array,
        text_embeddings: jax.Array,
        actions: jax.Array | None = None,
        t_action: jax.Array | None = None,
        proprio: jax.Array | None = None,
    ) -> WamOutput:
        cfg = self.cfg
        batch = latents.shape[0]
        num_actions = 0 if actions is None else actions.shape[1]
        num_proprio = 0 if (actions is None or proprio is None) else 1
        layout = make_token_layout(cfg, latents.shape[1:4], num_actions, num_proprio, self.pad_to_multiple)
        gf = layout.grid[0]

        cond = ConditionEmbedder(cfg, name="condition_embedder")
        video_tokens = PatchEmbed(cfg, name="patch_embedding")(latents)
        t_frames = _per_group(t_video, batch, latents.shape[1], "t_video")[:, :: cfg.patch_size[0]][:, :gf]
        temb, modulation = cond.time(t_frames)
        context = cond.text(text_embeddings)
        tokens, tembs, modulations = [video_tokens], [temb], [modulation]

        action_module = None
        if actions is not None:
            if t_action is None:
                raise ValueError("actions were given without t_action")
            action_module = ActionTokens(cfg, name="actions")
            tokens.append(action_module.encode_actions(actions))
            a_temb, a_mod = action_module.time(_per_group(t_action, batch, num_actions, "t_action"))
            tembs.append(a_temb)
            modulations.append(a_mod)
            if num_proprio:
                tokens.append(action_module.encode_proprio(proprio))
                # Proprio is an observation, never noised: it reads the clean-timestep modulation.
                p_temb, p_mod = action_module.time(jnp.zeros((batch, 1), jnp.float32))
                tembs.append(p_temb)
                modulations.append(p_mod)
        if layout.num_padding_tokens:
            tokens.append(jnp.zeros((batch, layout.num_padding_tokens, cfg.dim), video_tokens.dtype))

        x = constrain(jnp.concatenate(tokens, axis=1), ("batch", "length", "embed"))
        group_modulation = jnp.concatenate(modulations, axis=1)
        group_temb = jnp.concatenate(tembs, axis=1)
        cos = jnp.asarray(jnp.cos(layout.rope_angles), jnp.float32)
        sin = jnp.asarray(jnp.sin(layout.rope_angles), jnp.float32)

        x = BlockStack(cfg, layout, name="blocks")(x, context, group_modulation, (cos, sin))

        out_table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(
                lambda key, shape: jax.random.normal(key, shape) / cfg.dim**0.5, (None, None, "embed")
            ),
            (1, 2, cfg.dim),
        )
        out_mod = modulate_per_group(out_table[None] + group_temb[:, :, None], layout.token_group, layout.num_groups)
        shift, scale = out_mod[:, :, 0], out_mod[:, :, 1]
        h = LayerNorm(cfg.eps, name="norm_out")(x) * (1 + scale) + shift
        nv = layout.num_video_tokens
        pt, ph, pw = cfg.patch_size
        video = Dense(cfg.out_channels * pt * ph * pw, ("embed", None), dtype=cfg.compute_dtype, name="proj_out")(
            h[:, :nv].astype(cfg.compute_dtype)
        )
        video = unpatchify(cfg, video.astype(jnp.float32), layout.grid)
        action_velocity = None
        if action_module is not None:
            action_velocity = action_module.decode(h[:, nv : nv + num_actions])
        return WamOutput(video, action_velocity)


def init_params(
    cfg: ModelConfig,
    rng: jax.Array,
    latent_shape: tuple[int, int, int, int],
    text_length: int,
    num_action_tokens: int = 0,
    with_proprio: bool = True,
) -> Params:
    """Fresh parameters (a plain pytree of arrays, logical-axis boxes removed) for the given input shapes.

    latent_shape is (F, H, W, C); with num_action_tokens=0 the tree is the video backbone only.
    """
    variables = WorldActionModel(cfg).init(rng, *example_inputs(cfg, latent_shape, text_length,
                                                                 num_action_tokens, with_proprio))
    return nn.meta.unbox(variables["params"])


def example_inputs(
    cfg: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    text_length: int,
    num_action_tokens: int = 0,
    with_proprio: bool = True,
    batch: int = 1,
) -> tuple[jax.Array, ...]:
    """Zero inputs of the right shapes for init / abstract evaluation."""
    latents = jnp.zeros((batch, *latent_shape), jnp.float32)
    t = jnp.zeros((batch,), jnp.float32)
    text = jnp.zeros((batch, text_length, cfg.text_dim), jnp.float32)
    if not num_action_tokens:
        return latents, t, text
    actions = jnp.zeros((batch, num_action_tokens, cfg.action_dim), jnp.float32)
    proprio = jnp.zeros((batch, cfg.proprio_dim), jnp.float32) if with_proprio else None
    return latents, t, text, actions, t, proprio


def param_logical_axes(
    cfg: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    text_length: int,
    num_action_tokens: int = 0,
) -> Params:
    """The logical axis names of every parameter (a pytree of PartitionSpecs of logical names)."""
    abstract = jax.eval_shape(
        lambda: WorldActionModel(cfg).init(
            jax.random.key(0), *example_inputs(cfg, latent_shape, text_length, num_action_tokens)
        )
    )
    return nn.get_partition_spec(abstract)["params"]


def wam_forward(
    cfg: ModelConfig,
    params: Params,
    latents: jax.Array,
    t_video: jax.Array,
    text_embeddings: jax.Array,
    actions: jax.Array | None = None,
    t_action: jax.Array | None = None,
    proprio: jax.Array | None = None,
    pad_to_multiple: int = 1,
) -> WamOutput:
    """Pure forward of the world-action model. Latents are channels-last [B, F, H, W, C]."""
    return WorldActionModel(cfg, pad_to_multiple).apply(
        {"params": params}, latents, t_video, text_embeddings, actions, t_action, proprio
    )


def dit_forward(
    cfg: ModelConfig, params: Params, latents: jax.Array, timestep: jax.Array, text_embeddings: jax.Array
) -> jax.Array:
    """Video-only forward: velocity for channels-last latents [B, F, H, W, C] (JAX convention; diffusers'
    WanTransformer3DModel takes [B, C, F, H, W]). timestep is [B] on Wan's 0..1000 scale."""
    return wam_forward(cfg, params, latents, timestep, text_embeddings).video


def backbone_params(params: Params) -> Params:
    """The video-backbone subtree (everything except the action modules)."""
    return {k: v for k, v in params.items() if k != "actions"}


def count_params(tree: Params) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree_util.tree_leaves(tree)))
