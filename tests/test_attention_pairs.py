"""Attention FLOPs as the mask allows: visible pairs against the dense reference mask, and the block pairs the
block kernels skip against the kernels' own decisions (blockwise's `lax.cond` branches, splash's mask info)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import attention_mask

from wamjax.flops import analytic, attention_pairs
from wamjax.models import blockwise, splash
from wamjax.models.attention_mask import cached_chunk_mask
from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.token_layout import layout_attention_mask, make_token_layout

# (name, model overrides, mode, frames, resolution, pad_to_multiple, proprio tokens, views)
LAYOUTS = [
    ("bidirectional", {}, "joint", 9, (32, 32), 1, 1, 1),
    ("bidirectional padded", {}, "joint", 9, (32, 32), 8, 1, 1),
    ("chunk_causal", dict(attention_layout="chunk_causal", history="diffusion_forcing"), "joint", 13, (32, 48),
     1, 1, 1),
    ("chunk_causal padded, state per chunk", dict(attention_layout="chunk_causal", history="diffusion_forcing"),
     "joint", 13, (32, 32), 8, 4, 1),
    ("teacher_forcing", dict(attention_layout="chunk_causal"), "joint", 17, (32, 32), 1, 1, 1),
    ("teacher_forcing padded, state per chunk, 2 views", dict(attention_layout="chunk_causal"), "joint", 17,
     (32, 32), 16, 5, 2),
    ("teacher_forcing video, 2-frame chunks", dict(attention_layout="chunk_causal", chunk_latent_frames=2), "video",
     21, (32, 32), 1, 0, 1),
]  # fmt: skip


def _case(overrides, mode, frames, resolution, pad, proprio, views):
    cfg = dataclasses.replace(ModelConfig.from_dict(SIZES["tiny"]), **{"history": "teacher_forcing", **overrides})
    shape = analytic.SequenceShape(mode=mode, num_frames=frames, resolution=resolution, text_length=8,
                                   pad_to_multiple=pad, num_proprio=max(proprio, 1), views=views)
    tok = analytic.token_counts(cfg, shape)
    # The layout the model builds for the same clip, straight from `make_token_layout`.
    layout = make_token_layout(cfg, tok.latent_shape, tok.action, tok.proprio, pad,
                               teacher_forcing=tok.teacher_forcing, num_views=views)
    return cfg, shape, layout


def _reference(layout) -> np.ndarray:
    """bool [S, S] of the pairs a valid query sees, from the dense reference mask."""
    dense = attention_mask(layout)
    dense = np.ones((layout.length, layout.length), bool) if dense is None else dense
    return dense & layout.token_valid[:, None]


@pytest.mark.parametrize("name,overrides,mode,frames,resolution,pad,proprio,views", LAYOUTS,
                         ids=[c[0] for c in LAYOUTS])
def test_model_attention_flops_are_the_dense_count_times_the_visible_fraction(
    name, overrides, mode, frames, resolution, pad, proprio, views
):
    cfg, shape, layout = _case(overrides, mode, frames, resolution, pad, proprio, views)
    reference = _reference(layout)
    fraction = reference.sum() / reference.size
    model = analytic.forward_flops(cfg, shape)
    dense = analytic.forward_flops(cfg, shape, kernel="dot_product")
    assert model["self_attention_scores"] == pytest.approx(fraction * dense["self_attention_scores"], rel=1e-12)
    pairs = attention_pairs.layout_pairs(layout, "dot_product")
    assert pairs.visible == reference.sum() and pairs.computed == pairs.dense == layout.length**2
    if "chunk" in name or "teacher" in name:
        assert fraction < 0.9
    if name == "bidirectional":
        assert model == dense  # nothing masked: the count is today's, exactly


@pytest.mark.parametrize("name,overrides,mode,frames,resolution,pad,proprio,views", LAYOUTS[1:],
                         ids=[c[0] for c in LAYOUTS[1:]])
def test_block_visibility_matches_the_reference_mask_block_by_block(
    name, overrides, mode, frames, resolution, pad, proprio, views
):
    _, _, layout = _case(overrides, mode, frames, resolution, pad, proprio, views)
    mask = layout_attention_mask(layout)
    for block in (8, 24):
        s = layout.length - layout.length % block
        sliced = dataclasses.replace(mask, q_chunk=mask.q_chunk[:s], kv_chunk=mask.kv_chunk[:s],
                                     q_copy=mask.q_copy[:s], kv_copy=mask.kv_copy[:s], kv_valid=mask.kv_valid[:s])
        dense = mask.dense_numpy()[:s, :s]
        expected = dense.reshape(s // block, block, s // block, block).any(axis=(1, 3))
        np.testing.assert_array_equal(attention_pairs.visible_blocks(sliced, block, block), expected)


# Chunk-causal and teacher-forced, padded, with per-chunk state tokens; 16 tokens per latent frame and view.
# The teacher-forced one at 24-token blocks, which do not divide its 304 tokens: the kernel pads them.
BLOCK_CASES = [(c[0], c[1], c[2], c[3], (64, 64), *c[5:], block) for c, block in ((LAYOUTS[3], 16), (LAYOUTS[5], 24))]


@pytest.mark.parametrize("name,overrides,mode,frames,resolution,pad,proprio,views,block", BLOCK_CASES,
                         ids=[c[0] for c in BLOCK_CASES])
def test_blockwise_skips_the_block_pairs_counted_as_skipped(
    name, overrides, mode, frames, resolution, pad, proprio, views, block
):
    _, _, layout = _case(overrides, mode, frames, resolution, pad, proprio, views)
    pairs = attention_pairs.layout_pairs(layout, "blockwise", block, block)
    assert pairs.skipped_block_pairs > 0
    mask = layout_attention_mask(layout)
    q = jax.random.normal(jax.random.key(0), (1, layout.length, 2, 8))
    loss = lambda q, k, v: blockwise.attention(q, k, v, mask, block, block).astype(jnp.float32).sum()
    with blockwise.counting_branches() as taken:
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q))
    # The kernel's own lax.cond decisions, reported by the branches as they ran: once forward, once backward.
    for phase in ("forward", "backward"):
        assert taken[(phase, "skipped")] == pairs.skipped_block_pairs, dict(taken)
        assert taken[(phase, "computed")] == pairs.block_pairs - pairs.skipped_block_pairs
    assert pairs.computed == (pairs.block_pairs - pairs.skipped_block_pairs) * pairs.block_q * pairs.block_kv
    assert pairs.visible < pairs.computed < pairs.dense


# Long enough for several of splash's 128-token blocks: 64 tokens per latent frame.
SPLASH_CASES = [(c[0], c[1], c[2], c[3], (128, 128), *c[5:]) for c in LAYOUTS[2:]]


@pytest.mark.parametrize("name,overrides,mode,frames,resolution,pad,proprio,views", SPLASH_CASES,
                         ids=[c[0] for c in SPLASH_CASES])
def test_splash_skips_the_block_pairs_counted_as_skipped(
    name, overrides, mode, frames, resolution, pad, proprio, views
):
    _, _, layout = _case(overrides, mode, frames, resolution, pad, proprio, views)
    pairs = attention_pairs.layout_pairs(layout, "splash", 128, 128)
    assert pairs.block_pairs >= 9 and pairs.skipped_block_pairs > 0
    padded, bq, bk = splash.padded_mask(layout_attention_mask(layout), layout.length, layout.length, 128, 128)
    assert (bq, bk) == (pairs.block_q, pairs.block_kv)
    kernel = splash.make_kernel(padded, bq, bk, heads=2, interpret=True)
    # Splash's own mask processing: 0 marks a block pair its grid skips, forward and dK/dV alike.
    for info in (kernel.fwd_mask_info, kernel.dkv_mask_info):
        assert int((np.asarray(info.block_mask)[0] != 0).sum()) == pairs.block_pairs - pairs.skipped_block_pairs
    assert pairs.block_pairs == (padded.q_length // bq) * (padded.kv_length // bk)


def test_kv_cached_chunk_pairs_follow_the_fill_level():
    chunk, capacity, block = 40, 96, 16
    for visible in (0, 30, 96):
        mask = cached_chunk_mask(chunk, capacity, jnp.asarray(visible))  # what `cached_chunk.chunk_forward` builds
        reference = int(np.asarray(mask.dense()).sum())
        for kernel in ("dot_product", "splash"):
            pairs = attention_pairs.cached_chunk_pairs(chunk, capacity, visible, kernel, block, block)
            assert pairs.visible == reference == chunk * (visible + chunk)
        assert attention_pairs.cached_chunk_pairs(chunk, capacity, visible, "dot_product").computed == (
            chunk * (capacity + chunk))
        pairs = attention_pairs.cached_chunk_pairs(chunk, capacity, visible, "blockwise", block, block)
        q = jax.random.normal(jax.random.key(1), (1, chunk, 2, 8))
        kv = jax.random.normal(jax.random.key(2), (1, capacity + chunk, 2, 8))
        attend = lambda q, kv, fill: blockwise.attention(q, kv, kv, cached_chunk_mask(chunk, capacity, fill),
                                                         block, block)
        with blockwise.counting_branches() as taken:  # the fill level is traced, decided on the device
            jax.block_until_ready(jax.jit(attend)(q, kv, jnp.asarray(visible)))
        assert taken[("forward", "skipped")] == pairs.skipped_block_pairs, (visible, dict(taken))
        assert pairs.skipped_block_pairs == (capacity - visible) // block * -(-chunk // block)


def test_pair_counts_name_what_they_refuse():
    with pytest.raises(ValueError, match="model.attention='auto'"):
        attention_pairs.attention_pairs(None, 8, 8, "auto")
    traced = cached_chunk_mask(4, 8, jnp.asarray(2))
    with pytest.raises(ValueError, match="static mask"):
        attention_pairs.visible_pairs(traced)
