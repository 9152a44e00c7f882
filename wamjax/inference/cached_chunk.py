"""One chunk of a chunk-causal sequence through the model, attending to cached keys and values.

A chunk (latent frames, the action tokens aligned with them, optionally a state token) is embedded by the
model's own `WorldActionModel.embed_tokens`, run through the model's `WanBlock`s (a `lax.scan` over the stacked
layers) against the per-layer cache, and decoded by its `OutputHead` and `ActionTokens`; the chunk's own keys
and values come back for the caller to cache (`wamjax.inference.kv_cache` keeps the rollout's bookkeeping).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from wamjax.models.actions import ActionTokens
from wamjax.models.attention_mask import cached_chunk_mask
from wamjax.models.config import ModelConfig
from wamjax.models.dit import WanBlock
from wamjax.models.token_layout import sequence_token_group, video_rope_angles
from wamjax.models.wam import OutputHead, WorldActionModel, unpatchify_video

Params = Any


class KVCache(NamedTuple):
    """Per-layer keys (rotated) and values of the cached chunks; positions >= length are unused."""

    keys: jax.Array  # [L, B, capacity, heads, head_dim]
    values: jax.Array  # [L, B, capacity, heads, head_dim]
    length: jax.Array  # int32 []: tokens written


def stacked_block_params(cfg: ModelConfig, params: Params) -> Params:
    """Block params with a leading layer axis, whether the model was built scanned or unrolled."""
    blocks = params["blocks"]
    if "layers" in blocks:
        return blocks["layers"]["block"]
    layers = [blocks[f"layers_{i}"]["block"] for i in range(cfg.num_layers)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


# --- Chunk embedding -----------------------------------------------------------------------------------


class ChunkTokens(NamedTuple):
    """One chunk's inputs to the blocks: tokens, per-token modulation and temb, rotary cos/sin."""

    x: jax.Array  # [B, S, D]
    modulation: jax.Array  # [B, S, 6, D]
    temb: jax.Array  # [B, S, D]
    cos: jax.Array  # [S, head_dim // 2]
    sin: jax.Array
    num_video: int
    num_actions: int
    views: int | None = None


def embed_chunk(
    cfg: ModelConfig,
    max_frames: int,
    params: Params,
    latents: jax.Array,
    t_frames: jax.Array,
    frame_offset: jax.Array,
    actions: jax.Array | None = None,
    t_actions: jax.Array | None = None,
    action_offset: jax.Array | int = 0,
    proprio: jax.Array | None = None,
) -> ChunkTokens:
    """Tokens of one chunk: latents [B, n, H, W, C] (or [B, n, V, H, W, C]) at frames frame_offset.., t_frames
    [B, n] (0..1000 scale), optional actions [B, na, A] at action positions action_offset.. with t_actions
    [B, na], optional proprio; `max_frames` latent frames fit the rollout's window.

    The model's own `WorldActionModel.embed_tokens` embeds them, as in training; the per-group modulation is
    spread over the chunk's tokens, with the rotary angles `make_token_layout` gives the same frames (views
    share them).
    """
    n = latents.shape[1]
    views = latents.shape[2] if latents.ndim == 6 else None
    gh, gw = latents.shape[-3] // cfg.patch_size[1], latents.shape[-2] // cfg.patch_size[2]
    per_frame = gh * gw * (views or 1)
    sequence = WorldActionModel(cfg).apply(
        {"params": params}, latents, t_frames, actions=actions, t_action=t_actions, proprio=proprio,
        action_offset=action_offset, method=WorldActionModel.embed_tokens,
    )
    num_actions = 0 if actions is None else actions.shape[1]
    num_unrotated = num_actions + int(proprio is not None)
    token_group = jnp.asarray(sequence_token_group(n, per_frame, num_actions, int(proprio is not None)))
    table = jnp.asarray(video_rope_angles(cfg, (max_frames, gh, gw), views or 1))
    angles = jax.lax.dynamic_slice_in_dim(table, frame_offset * per_frame, n * per_frame, axis=0)
    angles = jnp.concatenate([angles, jnp.zeros((num_unrotated, angles.shape[-1]), angles.dtype)], axis=0)
    return ChunkTokens(
        sequence.tokens, jnp.take(sequence.group_modulation, token_group, axis=1),
        jnp.take(sequence.group_temb, token_group, axis=1), jnp.cos(angles), jnp.sin(angles), n * per_frame,
        num_actions, views,
    )


# --- The model's blocks over a chunk, reading the cache ---------------------------------------------------


class ChunkOutput(NamedTuple):
    """Velocities of one chunk and its per-layer keys/values [L, B, S, heads, head_dim]."""

    video: jax.Array  # [B, n, H, W, C]
    actions: jax.Array | None  # [B, na, A]
    keys: jax.Array
    values: jax.Array


def chunk_forward(
    cfg: ModelConfig, params: Params, chunk: ChunkTokens, context: jax.Array, cache: KVCache,
    latent_hw: tuple[int, int], visible: jax.Array | None = None,
) -> ChunkOutput:
    """The model over one chunk attending to the cache; `context` is the projected text [B, L, D].

    Only the first `visible` cached tokens are attended to (default: all written ones): a chunk that is
    recomputed in place must not see its own stale entries or anything after it.
    """
    stacked = stacked_block_params(cfg, params)
    visible = cache.length if visible is None else visible
    capacity, s = cache.keys.shape[2], chunk.x.shape[1]
    mask = cached_chunk_mask(s, capacity, jnp.asarray(visible))
    block = WanBlock(cfg, None)

    def layer(x, inputs):
        p, cache_k, cache_v = inputs
        x, (k, v) = block.apply({"params": p}, x, context, chunk.modulation, (chunk.cos, chunk.sin),
                                kv_cache=(cache_k, cache_v), mask=mask)
        return x, (k.astype(cache_k.dtype), v.astype(cache_v.dtype))

    # An unscanned model (model.scan_layers=False) unrolls the loop: XLA then counts every layer's cost.
    x, (keys, values) = jax.lax.scan(layer, chunk.x, (stacked, cache.keys, cache.values), unroll=not cfg.scan_layers)
    nv, na = chunk.num_video, chunk.num_actions
    h, video = OutputHead(cfg).apply({"params": params}, x, chunk.temb, nv)
    ph, pw = cfg.patch_size[1:]
    grid = (nv // ((latent_hw[0] // ph) * (latent_hw[1] // pw) * (chunk.views or 1)), latent_hw[0] // ph,
            latent_hw[1] // pw)
    video = unpatchify_video(cfg, video, grid, chunk.views)
    actions = None
    if na:
        actions = ActionTokens(cfg).apply({"params": params["actions"]}, h[:, nv : nv + na], method=ActionTokens.decode)
    return ChunkOutput(video, actions, keys, values)


def write_chunk(cache: KVCache, keys: jax.Array, values: jax.Array, offset: jax.Array) -> KVCache:
    """Writes a chunk's keys/values at token `offset`; the cache length becomes max(length, offset + S)."""
    k = jax.lax.dynamic_update_slice_in_dim(cache.keys, keys, offset, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(cache.values, values, offset, axis=2)
    return KVCache(k, v, jnp.maximum(cache.length, offset + keys.shape[2]).astype(jnp.int32))
