"""WorldActionModel: the Wan video DiT over [video tokens | action tokens | proprio token | padding].

Mode is data: without `actions` the model is exactly the Wan video backbone (mode `video`); with them
(mode `joint`) action and proprio tokens join the same sequence with their own noise level. Timesteps are
on Wan's 0..1000 scale: t_video is [B] or per latent frame [B, F]; t_action is [B] or per action token.

Several camera views (`data.view_layout=tokens`) come as latents [B, F, V, H, W, C]: each view is patchified
on its own, gets its row of the learned `view_embedding` [V, dim] added, and the views of a latent frame sit
next to each other in the sequence (see `wamjax.models.token_layout`); the velocity comes back as [B, F, V, H, W, C].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wamjax.models.actions import ActionTokens
from wamjax.models.config import ModelConfig
from wamjax.models.dit import BlockStack, ConditionEmbedder, PatchEmbed, modulate_per_group, unpatchify
from wamjax.models.layers import Dense, constrain, modulated_layer_norm
from wamjax.models.token_layout import (
    history_sizes,
    make_token_layout,
    view_tokens_by_frame,
    view_tokens_by_view,
    views_into_batch,
    views_out_of_batch,
)

Params = Any
CLIP_IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token (Wan2.1-I2V)
I2V_MASK_CHANNELS = 4  # one per pixel frame of a latent frame (the Wan VAE's 4x time compression)


class WamOutput(NamedTuple):
    """Predicted velocities: video [B, F, H, W, C] (or [B, F, V, H, W, C] for several views) and actions
    [B, T_a, action_dim] (None in video mode)."""

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


class TokenSequence(NamedTuple):
    """The joint sequence the blocks read, before padding: tokens [B, S, D] and, per modulation group (in the
    order of `TokenLayout.token_group`), the timestep embedding [B, G, D] and its 6-way modulation [B, G, 6, D]."""

    tokens: jax.Array
    group_temb: jax.Array
    group_modulation: jax.Array


class ViewEmbedding(nn.Module):
    """The learned row per camera view [V, dim] added to that view's tokens (the tokens view layout)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, views: int) -> jax.Array:
        # Zeros: a pretrained single-view backbone starts out unchanged; the rows part as the views differ.
        return self.param("view_embedding", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                          (None, "embed")), (views, self.cfg.dim))


class WorldActionModel(nn.Module):
    """Joint video + action denoiser on a Wan-2.1-compatible transformer.

    `embed_tokens` assembles the token sequence and `embed_context` the text (and image) context; `__call__`
    runs the blocks and heads over them. The KV-cached rollout calls the same two methods on one chunk.
    """

    cfg: ModelConfig
    pad_to_multiple: int = 1

    def setup(self):
        cfg = self.cfg
        self.condition_embedder = ConditionEmbedder(cfg)
        self.patch_embedding = PatchEmbed(cfg)
        self.actions = ActionTokens(cfg)  # its parameters exist only once actions were embedded
        self.view_embedder = ViewEmbedding(cfg)
        nn.share_scope(self, self.view_embedder)  # the parameter is `view_embedding` at the top level

    def embed_context(self, text_embeddings: jax.Array, image_embeddings: jax.Array | None = None) -> Any:
        """The projected text [B, L, D], or (text, image tokens [B, N, D]) for the image-conditioned backbone."""
        context = self.condition_embedder.text(text_embeddings)
        if image_embeddings is None:
            return context
        return context, self.condition_embedder.image(image_embeddings)

    def embed_tokens(
        self,
        latents: jax.Array,
        t_video: jax.Array,
        *,
        actions: jax.Array | None = None,
        t_action: jax.Array | None = None,
        proprio: jax.Array | None = None,
        history_latents: jax.Array | None = None,
        history_actions: jax.Array | None = None,
        action_offset: jax.Array | int = 0,
    ) -> TokenSequence:
        """The sequence [video | actions | proprio | clean history video | clean history actions] with its
        per-group timestep embeddings. Actions sit at action positions `action_offset`.. (a cached chunk's);
        proprio [B, P] or [B, C, P] is embedded whenever given; `history_latents` (the clean input, shaped like
        `latents`) adds the teacher-forced clean copy of the chunks before the last, with `history_actions`."""
        cfg = self.cfg
        batch = latents.shape[0]
        pt = cfg.patch_size[0]
        gf = latents.shape[1] // pt
        view_embedding = self.view_embedder(latents.shape[2]) if latents.ndim == 6 else None
        video_tokens = embed_video(cfg, self.patch_embedding, latents, view_embedding)
        t_frames = _per_group(t_video, batch, latents.shape[1], "t_video")[:, ::pt][:, :gf]
        temb, modulation = self.condition_embedder.time(t_frames)
        tokens, tembs, modulations = [video_tokens], [temb], [modulation]

        def clean_group(time: Callable[[jax.Array], tuple[jax.Array, jax.Array]]) -> None:
            temb, modulation = time(jnp.zeros((batch, 1), jnp.float32))
            tembs.append(temb)
            modulations.append(modulation)

        num_actions = 0
        if actions is not None:
            if t_action is None:
                raise ValueError("actions were given without t_action")
            num_actions = actions.shape[1]
            tokens.append(self.actions.encode_actions(actions, action_offset))
            a_temb, a_mod = self.actions.time(_per_group(t_action, batch, num_actions, "t_action"))
            tembs.append(a_temb)
            modulations.append(a_mod)
        if proprio is not None:
            tokens.append(self.actions.encode_proprio(proprio))
            clean_group(self.actions.time)  # proprio is an observation, never noised
        if history_latents is not None:
            # The clean history copy: same frames (all their views, with the same view embedding), rope positions
            # and action positions as the noisy chunks it repeats, read at t=0 (one modulation group per modality).
            if history_latents.shape != latents.shape:
                raise ValueError(f"history_latents have shape {history_latents.shape}; expected the latents' "
                                 f"{latents.shape}")
            history_frames, history_action_tokens = history_sizes(cfg, gf, num_actions)
            if history_frames:  # none when there is one chunk after the context
                clean_frames = history_latents[:, pt : pt * (1 + history_frames)]
                tokens.append(embed_video(cfg, self.patch_embedding, clean_frames, view_embedding))
            clean_group(self.condition_embedder.time)
            if history_action_tokens:
                if history_actions is None or history_actions.shape != actions.shape:
                    got = None if history_actions is None else history_actions.shape
                    raise ValueError(f"history_actions must be the clean actions, shaped like the actions "
                                     f"{actions.shape}; got {got}")
                tokens.append(self.actions.encode_actions(history_actions[:, :history_action_tokens]))
                clean_group(self.actions.time)
        return TokenSequence(jnp.concatenate(tokens, axis=1), jnp.concatenate(tembs, axis=1),
                             jnp.concatenate(modulations, axis=1))

    @nn.compact
    def __call__(
        self,
        latents: jax.Array,
        t_video: jax.Array,
        text_embeddings: jax.Array,
        *,
        actions: jax.Array | None = None,
        t_action: jax.Array | None = None,
        proprio: jax.Array | None = None,
        image_embeddings: jax.Array | None = None,
        history_latents: jax.Array | None = None,
        history_actions: jax.Array | None = None,
    ) -> WamOutput:
        """Velocities of the noisy inputs. proprio is [B, P] (one state token, in chunk 0) or [B, C, P] (one per
        chunk of a chunk-causal layout: chunk k's is the state its actions start from, in chunk k; teacher-forced,
        only chunk k's noisy tokens read it). With `history_latents` (the clean model input, shaped like
        `latents`) and, in joint mode, `history_actions` (the clean actions) the sequence is teacher-forced: a
        clean copy of the chunks before the last joins it, and noisy chunk i attends to the clean chunks before
        it and to itself (model.history="teacher_forcing"); without them each chunk attends to the earlier
        chunks of the one copy given."""
        cfg = self.cfg
        batch = latents.shape[0]
        _check_conditioning(cfg, latents, image_embeddings)
        num_actions = 0 if actions is None else actions.shape[1]
        num_proprio = 0
        if actions is not None and proprio is not None:
            if proprio.ndim not in (2, 3):
                raise ValueError(f"proprio has shape {proprio.shape}; expected [B, P] or [B, chunks, P]")
            num_proprio = 1 if proprio.ndim == 2 else proprio.shape[1]
        views = latents.shape[2] if latents.ndim == 6 else None
        spatial = (latents.shape[1], *latents.shape[-3:-1])
        layout = make_token_layout(cfg, spatial, num_actions, num_proprio, self.pad_to_multiple,
                                   teacher_forcing=history_latents is not None, num_views=views or 1)

        sequence = self.embed_tokens(latents, t_video, actions=actions, t_action=t_action,
                                     proprio=proprio if num_proprio else None, history_latents=history_latents,
                                     history_actions=history_actions)
        context = self.embed_context(text_embeddings, image_embeddings)
        x = sequence.tokens
        if layout.num_padding_tokens:
            x = jnp.concatenate([x, jnp.zeros((batch, layout.num_padding_tokens, cfg.dim), x.dtype)], axis=1)
        x = constrain(x, ("batch", "length", "embed"))
        cos = jnp.asarray(jnp.cos(layout.rope_angles), jnp.float32)
        sin = jnp.asarray(jnp.sin(layout.rope_angles), jnp.float32)

        x = BlockStack(cfg, layout, name="blocks")(x, context, sequence.group_modulation, (cos, sin))

        head = OutputHead(cfg)
        nn.share_scope(self, head)  # Wan's parameter names: scale_shift_table, proj_out at the top level
        h, video = head(x, sequence.group_temb, layout.num_video_tokens, layout.token_group, layout.num_groups)
        video = unpatchify_video(cfg, video, layout.grid, views)
        nv = layout.num_video_tokens
        action_velocity = None
        if actions is not None:
            action_velocity = self.actions.decode(h[:, nv : nv + num_actions])
        return WamOutput(video, action_velocity)


class OutputHead(nn.Module):
    """Final modulated norm of every token and the video projection of the first `num_video` tokens.

    `temb` is per group [B, G, D] spread by `token_group`, or per token [B, S, D] when `token_group` is None.
    Returns (normed tokens [B, S, D], video patches [B, num_video, pt*ph*pw*C] in float32).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, temb, num_video: int, token_group=None, num_groups: int | None = None):
        cfg = self.cfg
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(
                lambda key, shape: jax.random.normal(key, shape) / cfg.dim**0.5, (None, None, "embed")
            ),
            (1, 2, cfg.dim),
        )
        mod = table[None] + temb[:, :, None]
        if token_group is not None:
            mod = modulate_per_group(mod, token_group, num_groups)
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        h = modulated_layer_norm(x, scale, shift, cfg.eps)
        pt, ph, pw = cfg.patch_size
        video = Dense(cfg.out_channels * pt * ph * pw, ("embed", None), dtype=cfg.compute_dtype, name="proj_out")(
            h[:, :num_video].astype(cfg.compute_dtype)
        )
        return h, video.astype(jnp.float32)


def embed_video(
    cfg: ModelConfig, patch_embed: Callable[[jax.Array], jax.Array], latents: jax.Array,
    view_embedding: jax.Array | None = None,
) -> jax.Array:
    """Video tokens [B, S, dim] of latents [B, F, H, W, C], or of several views [B, F, V, H, W, C] (each
    patchified alone, its view embedding row added, tokens ordered (frame, view, h, w))."""
    if latents.ndim == 5:
        return patch_embed(latents)
    if latents.ndim != 6:
        raise ValueError(f"latents have shape {latents.shape}; expected [B, F, H, W, C] or [B, F, V, H, W, C]")
    views = latents.shape[2]
    if view_embedding is None or view_embedding.shape[0] != views:
        have = None if view_embedding is None else tuple(view_embedding.shape)
        raise ValueError(f"latents have {views} views (shape {latents.shape}); the view_embedding parameter has "
                         f"shape {have}: the model was built for another number of views")
    tokens = patch_embed(views_into_batch(latents))  # [B * V, F' * N, dim]
    tokens = tokens.reshape(-1, views, *tokens.shape[1:]) + view_embedding[None, :, None].astype(tokens.dtype)
    return view_tokens_by_frame(tokens.reshape(-1, *tokens.shape[2:]), views, latents.shape[1] // cfg.patch_size[0])


def unpatchify_video(cfg: ModelConfig, tokens: jax.Array, grid: tuple[int, int, int], views: int | None) -> jax.Array:
    """Projected video tokens [B, S, pt*ph*pw*C] -> latents [B, F, H, W, C], or [B, F, V, H, W, C] for `views`."""
    if views is None:
        return unpatchify(cfg, tokens, grid)
    return views_out_of_batch(unpatchify(cfg, view_tokens_by_view(tokens, views, grid[0]), grid), views)


def _check_conditioning(cfg: ModelConfig, latents: jax.Array, image_embeddings: jax.Array | None) -> None:
    if latents.shape[-1] != cfg.in_channels:
        hint = " (noisy latents + 4 mask channels + conditioning-frame latents, see i2v_model_input)" \
            if cfg.image_conditioned else ""
        raise ValueError(f"latents have {latents.shape[-1]} channels (shape {latents.shape}); "
                         f"model.in_channels={cfg.in_channels}{hint}")
    if cfg.image_conditioned and image_embeddings is None:
        raise ValueError(f"model.image_dim={cfg.image_dim}: the image-conditioned backbone needs image_embeddings "
                         f"[B, tokens, {cfg.image_dim}]")
    if not cfg.image_conditioned and image_embeddings is not None:
        raise ValueError("image_embeddings were given but model.image_dim is None (a text-to-video backbone)")


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
    variables = WorldActionModel(cfg).init(rng, **example_inputs(cfg, latent_shape, text_length,
                                                                  num_action_tokens, with_proprio))
    return nn.meta.unbox(variables["params"])


def example_inputs(
    cfg: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    text_length: int,
    num_action_tokens: int = 0,
    with_proprio: bool = True,
    batch: int = 1,
    num_image_tokens: int | None = None,
) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes for init / abstract evaluation, keyed by `wam_forward`'s argument names;
    absent inputs are left out (image tokens: CLIP ViT-H/14's count unless given)."""
    t = jnp.zeros((batch,), jnp.float32)
    inputs = {
        "latents": jnp.zeros((batch, *latent_shape), jnp.float32),
        "t_video": t,
        "text_embeddings": jnp.zeros((batch, text_length, cfg.text_dim), jnp.float32),
    }
    if num_action_tokens:
        inputs["actions"] = jnp.zeros((batch, num_action_tokens, cfg.action_dim), jnp.float32)
        inputs["t_action"] = t
        if with_proprio:
            inputs["proprio"] = jnp.zeros((batch, cfg.proprio_dim), jnp.float32)
    if cfg.image_conditioned:
        tokens = num_image_tokens or cfg.pos_embed_seq_len or CLIP_IMAGE_TOKENS
        inputs["image_embeddings"] = jnp.zeros((batch, tokens, cfg.image_dim), jnp.float32)
    return inputs


def wam_forward(
    cfg: ModelConfig,
    params: Params,
    latents: jax.Array,
    t_video: jax.Array,
    text_embeddings: jax.Array,
    *,
    actions: jax.Array | None = None,
    t_action: jax.Array | None = None,
    proprio: jax.Array | None = None,
    image_embeddings: jax.Array | None = None,
    pad_to_multiple: int = 1,
    history_latents: jax.Array | None = None,
    history_actions: jax.Array | None = None,
) -> WamOutput:
    """Pure forward of the world-action model. Latents are channels-last [B, F, H, W, C] with all
    `in_channels` (for I2V the caller concatenates the conditioning channels, see `i2v_model_input`);
    image_embeddings [B, tokens, image_dim] are the CLIP tokens of the image-conditioned backbone;
    history_latents / history_actions (the clean inputs) make the sequence teacher-forced
    (`WorldActionModel.__call__`)."""
    return WorldActionModel(cfg, pad_to_multiple).apply(
        {"params": params}, latents, t_video, text_embeddings, actions=actions, t_action=t_action, proprio=proprio,
        image_embeddings=image_embeddings, history_latents=history_latents, history_actions=history_actions,
    )


def dit_forward(
    cfg: ModelConfig,
    params: Params,
    latents: jax.Array,
    timestep: jax.Array,
    text_embeddings: jax.Array,
    *,
    image_embeddings: jax.Array | None = None,
) -> jax.Array:
    """Video-only forward: velocity for channels-last latents [B, F, H, W, in_channels] (JAX convention;
    diffusers' WanTransformer3DModel takes [B, C, F, H, W]). timestep is [B] on Wan's 0..1000 scale;
    image_embeddings [B, tokens, image_dim] for the image-conditioned (I2V) backbone."""
    return wam_forward(cfg, params, latents, timestep, text_embeddings, image_embeddings=image_embeddings).video


def i2v_condition(condition_latents: jax.Array, num_conditioned_frames: int = 1) -> jax.Array:
    """The 20 conditioning channels Wan2.1-I2V reads: [4 mask channels | conditioning latents], channels-last.

    condition_latents [B, F, H, W, z] are the normalized VAE latents of the conditioning video: the first
    frame followed by zero frames (`first_frame_video`), as diffusers' WanImageToVideoPipeline encodes it.
    The mask has one channel per pixel frame inside a latent frame (the VAE's 4x time compression): 1 on the
    first latent frame (the given frame, repeated 4 times as the pipeline does), 0 elsewhere.
    Several views [B, F, V, H, W, z] are conditioned each on its own first frame, with the same mask.
    """
    b, f, *rest, _ = condition_latents.shape
    known = (jnp.arange(f) < num_conditioned_frames).astype(condition_latents.dtype)
    known = known.reshape(1, f, *([1] * (len(rest) + 1)))
    mask = jnp.broadcast_to(known, (b, f, *rest, I2V_MASK_CHANNELS))
    return jnp.concatenate([mask, condition_latents], axis=-1)


def i2v_model_input(noisy_latents: jax.Array, condition_latents: jax.Array) -> jax.Array:
    """Noisy latents [B, F, H, W, z] + conditioning -> the transformer's [B, F, H, W, 2z + 4] input (diffusers'
    order: noisy latents, mask, conditioning latents)."""
    return jnp.concatenate([noisy_latents, i2v_condition(condition_latents)], axis=-1)


def first_frame_video(frames: jax.Array) -> jax.Array:
    """Frames [B, T, ...] -> the conditioning video: frame 0 kept, frames 1.. zeroed (in the VAE's [-1, 1] space
    zero is mid-grey, as in diffusers' pipeline, which zeroes the preprocessed video)."""
    keep = (jnp.arange(frames.shape[1]) == 0).reshape(1, -1, *([1] * (frames.ndim - 2)))
    return jnp.where(keep, frames, jnp.zeros((), frames.dtype))


def count_params(tree: Params) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(int(jnp.size(x)) if hasattr(x, "size") else 0 for x in jax.tree_util.tree_leaves(tree)))
