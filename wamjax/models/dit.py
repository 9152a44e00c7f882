"""Wan-2.1-compatible video diffusion transformer blocks (math and parameter names of diffusers' Wan).

Latents are channels-last [B, F, H, W, C] (several camera views: [B, F, V, H, W, C]); the order of their tokens
in the sequence, the attention chunks and the rotary angles are the static `TokenLayout` of
`wamjax.models.token_layout`.
Modulation is per token group: every token belongs to a group (a latent frame, an action token, ...) and
each group has its own timestep, so video and actions can sit at independent noise levels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from wamjax.models import attention as attention_lib
from wamjax.models.attention_mask import AttentionMask
from wamjax.models.config import ModelConfig
from wamjax.models.layers import (
    Dense,
    LayerNorm,
    RMSNorm,
    activation_fn,
    constrain,
    modulate,
    recomputed,
    sinusoidal_embedding,
)
from wamjax.models.token_layout import TokenLayout, layout_attention_mask
from wamjax.parallel import context as context_parallel

BATCH_LENGTH_EMBED = ("batch", "length", "embed")
BLOCK_INPUT = "block_input"  # checkpoint name of each block's input activations (the scan carry)
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
    # As "full", but the one tensor full remat keeps per block (its input) waits in pinned host memory, not
    # HBM, until the backward pass needs it: the per-layer activation memory drops to zero.
    "offload_block_inputs": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT],
        offload_src="device", offload_dst="pinned_host",
    ),
    # As "dots_no_batch", with the saved matmul outputs offloaded to pinned host memory.
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


@recomputed
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x [B, S, H, D] by angles with cos/sin [S, D // 2]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def modulate_per_group(table: jax.Array, token_group: np.ndarray, num_groups: int) -> jax.Array:
    """Spreads a per-group table [B, G, ...] over tokens -> [B, S, ...] (broadcast when there is one group)."""
    if num_groups == 1:
        return table[:, :1]
    return jnp.take(table, jnp.asarray(token_group), axis=1)


class WanAttention(nn.Module):
    """Self- or cross-attention with RMSNorm on q and k across heads, as in Wan."""

    cfg: ModelConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x, context=None, rope=None, mask: AttentionMask | None = None, image_context=None,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None):
        """Attention output [B, S, D]; with `kv_cache` = (keys, values) [B, C, heads, head_dim] of cached tokens
        (self-attention only) the queries attend to [cached | own] keys under `mask`, and the result is
        (output, (own rotated keys, own values)) for the caller to cache."""
        cfg = self.cfg
        dim, heads = cfg.dim, cfg.num_attention_heads
        kv_in = x if context is None else context
        def lora(target: str) -> dict[str, Any]:
            rank = cfg.lora_rank_for("cross" if self.cross else target)
            return {"lora_rank": rank, "lora_scale": cfg.lora_scale} if rank else {}

        dense = lambda name, axes, target: Dense(dim, axes, dtype=cfg.compute_dtype, name=name, **lora(target))
        q = dense("to_q", ("embed", "heads"), "q")(x)
        k = dense("to_k", ("embed", "heads"), "k")(kv_in)
        v = dense("to_v", ("embed", "heads"), "v")(kv_in)
        q = RMSNorm(cfg.eps, name="norm_q")(q)
        k = RMSNorm(cfg.eps, name="norm_k")(k)
        split = lambda t: t.reshape(*t.shape[:2], heads, cfg.attention_head_dim)
        q, k, v = split(q), split(k), split(v)
        # Context parallelism: the sequence axis moves from length to heads around the kernel (all-to-all).
        heads_parallel = not self.cross and context_parallel.all_to_all_heads(heads)
        if heads_parallel:
            q, k, v = (constrain(t, context_parallel.ATTENTION_AXES) for t in (q, k, v))
        else:
            q = constrain(q, ("batch", "length", "heads", "kv"))
            kv_axes = ("batch", "text_length" if self.cross else "kv_length", "heads", "kv")
            k, v = constrain(k, kv_axes), constrain(v, kv_axes)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        own_kv = (k, v)
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            k = jnp.concatenate([cache_k, k.astype(cache_k.dtype)], axis=1)
            v = jnp.concatenate([cache_v, v.astype(cache_v.dtype)], axis=1)
        out = attention_lib.attention_for(cfg)(q, k, v, mask)
        if heads_parallel:
            out = constrain(out, context_parallel.ATTENTION_AXES)
        if image_context is not None:
            out = out + self._image_attention(q, image_context)
        out = out.reshape(*out.shape[:2], dim)
        out = constrain(out, ("batch", "length", "heads"))
        out = dense("to_out", ("heads", "embed"), "o")(out)
        return out if kv_cache is None else (out, own_kv)

    def _image_attention(self, q: jax.Array, image_context: jax.Array) -> jax.Array:
        """Wan2.1-I2V: the same queries attend to the embedded image tokens through their own keys/values."""
        cfg = self.cfg
        dense = lambda name: Dense(cfg.dim, ("embed", "heads"), dtype=cfg.compute_dtype, name=name)
        k = RMSNorm(cfg.eps, name="norm_added_k")(dense("add_k_proj")(image_context))
        v = dense("add_v_proj")(image_context)
        split = lambda t: t.reshape(*t.shape[:2], cfg.num_attention_heads, cfg.attention_head_dim)
        kv_axes = ("batch", "image_length", "heads", "kv")
        k, v = constrain(split(k), kv_axes), constrain(split(v), kv_axes)
        return attention_lib.attention_for(cfg)(q, k, v, None)


class _ActivatedDense(Dense):
    """A Dense layer applied to `activation(x)` (same parameters as Dense)."""

    activation: str = "gelu_tanh"

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(activation_fn(self.activation)(x))


class FeedForward(nn.Module):
    """GELU(tanh) MLP with diffusers' `net.0.proj` / `net.2` as `proj_in` / `proj_out`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        rank = cfg.lora_rank_for("ffn")
        lora = {"lora_rank": rank, "lora_scale": cfg.lora_scale} if rank else {}
        h = Dense(cfg.ffn_dim, ("embed", "mlp"), dtype=cfg.compute_dtype, name="proj_in", **lora)(x)
        h = constrain(h, ("batch", "length", "mlp"))
        # The GELU is recomputed in the backward pass from its input, so only one [S, ffn_dim] activation
        # is kept per block instead of the GELU's input and output.
        return nn.remat(_ActivatedDense)(cfg.dim, ("mlp", "embed"), dtype=cfg.compute_dtype, name="proj_out",
                                         **lora)(h)


class WanBlock(nn.Module):
    """One Wan transformer block: modulated self-attention, cross-attention to text, modulated FFN.

    Over a whole sequence `layout` gives the modulation groups and the mask. Over one chunk of a cached rollout
    `layout` is None: `group_modulation` is per token [B, S, 6, D], `kv_cache` holds the cached keys/values the
    chunk's self-attention reads under `mask`, and the block returns (x, (keys, values)) of the chunk.
    """

    cfg: ModelConfig
    layout: TokenLayout | None

    @nn.compact
    def __call__(self, x, context, group_modulation, rope, kv_cache: tuple[jax.Array, jax.Array] | None = None,
                 mask: AttentionMask | None = None):
        cfg, layout = self.cfg, self.layout
        if layout is not None:
            # Built from the static layout inside the block: O(S) ids, never an [S, S] constant.
            mask = layout_attention_mask(layout)
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(
                lambda key, shape: jax.random.normal(key, shape) / cfg.dim**0.5, (None, None, "embed")
            ),
            (1, 6, cfg.dim),
        )
        # [B, G, 6, D] per group, spread over tokens inside each use below, in float32 like diffusers.
        # Both sides of the per-token gather sharded like the activations (batch over data/fsdp): left to
        # propagation, the gather was split over `embed` with the whole global batch on every chip, e.g. a
        # 240 GB f32[64, 32760, 6, 5120] buffer for wan14b on v5p-128.
        per_group = constrain(table[None] + group_modulation, ("batch", None, None, "embed"))
        dtype = x.dtype

        def per_token(table: jax.Array, i: int) -> jax.Array:  # row i of the table -> [B, S or 1, D]
            mod = table[:, :, i]  # per token already without a layout (the cached rollout)
            if layout is not None:
                mod = modulate_per_group(mod, layout.token_group, layout.num_groups)
            return constrain(mod, ("batch", "length" if mod.shape[1] > 1 else None, "embed"))

        # The per-token modulation, norms and gated residuals are recomputed in the backward pass: kept,
        # their float32 [S, D] temporaries would outweigh the bfloat16 activations the matmuls keep.
        def adaln(shift: int, scale: int):
            return recomputed(lambda x, t: modulate(x, per_token(t, scale), per_token(t, shift), cfg.eps))

        def gated_residual(gate: int):
            return recomputed(lambda x, h, t: (x.astype(jnp.float32) + h.astype(jnp.float32) * per_token(t, gate))
                              .astype(dtype))

        h = adaln(0, 1)(x, per_group)
        h = WanAttention(cfg, name="attn1")(h.astype(dtype), rope=rope, mask=mask, kv_cache=kv_cache)
        if kv_cache is not None:
            h, own_kv = h
        x = gated_residual(2)(x, h, per_group)
        x = constrain(x, BATCH_LENGTH_EMBED)

        h = LayerNorm(cfg.eps, affine=True, name="norm2")(x) if cfg.cross_attn_norm else x
        # `context` is the text context, or (text, image) for the image-conditioned backbone.
        text_context, image_context = context if isinstance(context, tuple) else (context, None)
        x = x + WanAttention(cfg, cross=True, name="attn2")(
            h.astype(dtype), context=text_context, image_context=image_context
        )
        x = constrain(x, BATCH_LENGTH_EMBED)

        h = adaln(3, 4)(x, per_group)
        h = FeedForward(cfg, name="ffn")(h.astype(dtype))
        x = gated_residual(5)(x, h, per_group)
        x = constrain(x, BATCH_LENGTH_EMBED)
        return x if kv_cache is None else (x, own_kv)


class _ScanBody(nn.Module):
    """Adapts WanBlock to nn.scan's (carry, xs) -> (carry, ys) signature."""

    cfg: ModelConfig
    layout: TokenLayout

    @nn.compact
    def __call__(self, x, context, group_modulation, rope):
        x = checkpoint_name(x, BLOCK_INPUT)
        return WanBlock(self.cfg, self.layout, name="block")(x, context, group_modulation, rope), None


class BlockStack(nn.Module):
    """`num_layers` Wan blocks, scanned (one compiled body, stacked params) or unrolled, with optional remat."""

    cfg: ModelConfig
    layout: TokenLayout

    @nn.compact
    def __call__(self, x, context, group_modulation, rope):
        cfg = self.cfg
        if cfg.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={cfg.remat_policy!r}; known: {sorted(_REMAT_POLICIES)}")
        policy = _REMAT_POLICIES[cfg.remat_policy]
        body = _ScanBody
        if cfg.remat_policy != "none":
            body = nn.remat(_ScanBody, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(
                body,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(cfg, self.layout, name="layers")(x, context, group_modulation, rope)
            return x
        for i in range(cfg.num_layers):
            x, _ = body(cfg, self.layout, name=f"layers_{i}")(x, context, group_modulation, rope)
        return x


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6-way modulation), text -> context and (I2V) image tokens -> image context, as
    diffusers' WanTimeTextImageEmbedding."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.time_embedder = TimeEmbedding(cfg, name="time_embedder")
        self.time_proj = Dense(6 * cfg.dim, (None, "embed"), name="time_proj")
        self.text_embedder = TextProjection(cfg, name="text_embedder")
        if cfg.image_conditioned:
            self.image_embedder = ImageEmbedding(cfg, name="image_embedder")

    def image(self, image_embeddings: jax.Array) -> jax.Array:
        return self.image_embedder(image_embeddings)

    def time(self, timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
        temb = self.time_embedder(timesteps)
        mod = self.time_proj(jax.nn.silu(temb))
        return temb, mod.reshape(*mod.shape[:-1], 6, self.cfg.dim)

    def text(self, text_embeddings: jax.Array) -> jax.Array:
        return self.text_embedder(text_embeddings)

    def __call__(self, timesteps, text_embeddings):
        return (*self.time(timesteps), self.text(text_embeddings))


class TimeEmbedding(nn.Module):
    """Sinusoidal features (freq_dim) -> linear -> SiLU -> linear, in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, timesteps):
        cfg = self.cfg
        h = sinusoidal_embedding(timesteps, cfg.freq_dim)
        h = Dense(cfg.dim, (None, "embed"), name="linear_1")(h)
        return Dense(cfg.dim, ("mlp_small", "embed"), name="linear_2")(jax.nn.silu(h))


class TextProjection(nn.Module):
    """Text encoder states -> model width: linear -> GELU(tanh) -> linear."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, text):
        cfg = self.cfg
        h = Dense(cfg.dim, ("text_embed", "embed"), dtype=cfg.compute_dtype, name="linear_1")(text)
        h = activation_fn("gelu_tanh")(h)
        h = Dense(cfg.dim, ("mlp_small", "embed"), dtype=cfg.compute_dtype, name="linear_2")(h)
        return constrain(h, ("batch", "text_length", "embed"))


class ImageEmbedding(nn.Module):
    """CLIP image tokens [B, N, image_dim] -> [B, N, dim]: LayerNorm -> linear -> GELU -> linear -> LayerNorm
    (diffusers' WanImageEmbedding; `ff.net.0.proj` / `ff.net.2` are `proj_in` / `proj_out`).

    With `pos_embed_seq_len` (Wan FLF2V) a learned position embedding is added first; the caller passes the
    first- and last-frame tokens concatenated, [B, pos_embed_seq_len, image_dim].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, image):
        cfg = self.cfg
        if image.ndim != 3 or image.shape[-1] != cfg.image_dim:
            raise ValueError(f"image_embeddings have shape {image.shape}; expected [B, tokens, {cfg.image_dim}] "
                             "(model.image_dim)")
        if cfg.pos_embed_seq_len is not None:
            if image.shape[1] != cfg.pos_embed_seq_len:
                raise ValueError(f"image_embeddings have {image.shape[1]} tokens; model.pos_embed_seq_len="
                                 f"{cfg.pos_embed_seq_len}")
            pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                       (None, None, "image_embed")),
                             (1, cfg.pos_embed_seq_len, cfg.image_dim))
            image = image + pos
        # torch LayerNorm's default eps (diffusers' FP32LayerNorm here), not the model's eps.
        h = LayerNorm(1e-5, affine=True, name="norm1")(image)
        h = Dense(cfg.image_dim, ("image_embed", "mlp_small"), dtype=cfg.compute_dtype, name="proj_in")(h)
        h = activation_fn("gelu")(h)
        h = Dense(cfg.dim, ("mlp_small", "embed"), dtype=cfg.compute_dtype, name="proj_out")(h)
        h = LayerNorm(1e-5, affine=True, name="norm2")(h)
        return constrain(h, ("batch", "image_length", "embed"))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch_size, as a patchify + matmul; kernel [pt, ph, pw, C, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, latents):
        cfg = self.cfg
        pt, ph, pw = cfg.patch_size
        b, f, h, w, c = latents.shape
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None, "embed")),
            (pt, ph, pw, c, cfg.dim),
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (cfg.dim,))
        x = latents.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)
        k = kernel.reshape(pt * ph * pw * c, cfg.dim)
        x = jnp.dot(x.astype(cfg.compute_dtype), k.astype(cfg.compute_dtype)) + bias.astype(cfg.compute_dtype)
        return constrain(x, BATCH_LENGTH_EMBED)


def unpatchify(cfg: ModelConfig, tokens: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """[B, F*H*W, pt*ph*pw*C] -> channels-last latents [B, F*pt, H*ph, W*pw, C]."""
    pt, ph, pw = cfg.patch_size
    gf, gh, gw = grid
    b = tokens.shape[0]
    x = tokens.reshape(b, gf, gh, gw, pt, ph, pw, cfg.out_channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, gf * pt, gh * ph, gw * pw, cfg.out_channels)
