"""Attention kernels agree with `dot_product` on every mask (values and gradients), masks come from per-token
ids, and the kernel choice is resolved once with clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import attention_mask

from wamjax.models import attention as attention_lib
from wamjax.models import wam
from wamjax.models.attention_mask import PADDING_CHUNK, AttentionMask
from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.token_layout import layout_attention_mask, make_token_layout

HEADS, HEAD_DIM = 2, 8


def _masks() -> dict[str, tuple[int, int, AttentionMask | None]]:
    """(Sq, Sk, mask) for every layout the model builds, at ragged lengths."""
    chunk = np.repeat(np.arange(4), 5)[:19]
    valid = np.arange(19) < 16
    padded_chunk = np.where(valid, chunk, PADDING_CHUNK)
    clean_noisy_chunk = np.tile(np.repeat(np.arange(4), 3), 2)
    copy = np.repeat([0, 1], 12)
    cache_valid = np.concatenate([np.arange(21) < 13, np.ones(6, bool)])
    return {
        "bidirectional": (19, 19, None),
        "bidirectional+padding": (19, 19, AttentionMask.create(np.where(valid, 0, PADDING_CHUNK), kv_valid=valid)),
        "chunk_causal": (19, 19, AttentionMask.create(chunk)),
        "chunk_causal+padding": (19, 19, AttentionMask.create(padded_chunk, kv_valid=valid)),
        "kv_cache (Sq != Sk)": (6, 27, AttentionMask.create(np.zeros(6), np.zeros(27), kv_valid=cache_valid)),
        "teacher_forcing": (24, 24, AttentionMask.create(clean_noisy_chunk, q_copy=copy, rule="teacher_forcing")),
    }


def _qkv(sq: int, sk: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    draw = lambda s: jnp.asarray(rng.normal(size=(2, s, HEADS, HEAD_DIM)), jnp.float32)
    return draw(sq), draw(sk), draw(sk)


def _value_and_grads(kernel, q, k, v, mask):
    # A nonlinear read-out, so every output entry gets its own cotangent.
    loss = lambda q, k, v: jnp.sum(jnp.sin(kernel(q, k, v, mask)) * jnp.arange(q.shape[1])[None, :, None, None])
    return jax.jit(lambda q, k, v: (kernel(q, k, v, mask), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("name", list(_masks()))
def test_blockwise_equals_dot_product_values_and_gradients(name):
    sq, sk, mask = _masks()[name]
    q, k, v = _qkv(sq, sk)
    reference = _value_and_grads(attention_lib.get_attention("dot_product"), q, k, v, mask)
    # Blocks that divide nothing evenly: both lengths are padded inside the kernel.
    blockwise = attention_lib.get_attention("blockwise", attention_lib.KernelOptions(block_q=4, block_kv=7))
    got = _value_and_grads(blockwise, q, k, v, mask)
    for want, have in zip(jax.tree.leaves(reference), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), atol=1e-5, rtol=1e-5)
    if mask is not None:
        # Valid queries' outputs never depend on masked keys.
        dense = np.asarray(mask.dense())
        rows = np.flatnonzero(np.asarray(mask.kv_valid)[:sq]) if sq == sk else np.arange(sq)
        v_changed = jnp.where(jnp.asarray(dense.any(0))[None, :, None, None], v, v + 100.0)
        moved = blockwise(q, k, v_changed, mask)
        np.testing.assert_allclose(np.asarray(moved)[:, rows], np.asarray(got[0])[:, rows], atol=1e-5)


def test_blockwise_balances_its_blocks_over_the_sequence():
    from wamjax.models.blockwise import balanced_block

    for length in (1, 7, 64, 320, 513, 1280, 2880, 5120, 14073, 32760, 75600):
        for block in (8, 64, 512):
            size = balanced_block(length, block)
            count = -(-length // size)
            assert size <= block and count == -(-length // block)  # no more blocks than asked for
            assert count * size - length < max(8 * count, 1)  # padding: under 8 tokens per block
    assert balanced_block(1280, 512) == 432  # 3 x 432 (16 padded), not 3 x 512 (256 padded)
    # A ragged length with balanced blocks (70 tokens at 32: 3 blocks of 24) equals dot_product, with and
    # without a mask.
    q, k, v = _qkv(70, 70, seed=3)
    chunks = AttentionMask.create(np.repeat(np.arange(5), 14))
    kernel = attention_lib.get_attention("blockwise", attention_lib.KernelOptions(block_q=32, block_kv=32))
    for mask in (None, chunks):
        want = _value_and_grads(attention_lib.get_attention("dot_product"), q, k, v, mask)
        have = _value_and_grads(kernel, q, k, v, mask)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(have), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["xla", "cudnn"])
def test_jax_nn_kernels_equal_dot_product_on_every_mask(kernel):
    # Off GPU, cudnn resolves to xla; bidirectional + padding goes as key lengths, the rest as a mask.
    name = attention_lib.resolve_attention(kernel, jax.default_backend(), "float32" if kernel == "xla" else "bfloat16")
    fn = attention_lib.get_attention(name)
    for sq, sk, mask in _masks().values():
        q, k, v = _qkv(sq, sk)
        want = attention_lib.get_attention("dot_product")(q, k, v, mask)
        rows = np.arange(sq) if mask is None or sq != sk else np.flatnonzero(np.asarray(mask.kv_valid))
        np.testing.assert_allclose(np.asarray(fn(q, k, v, mask))[:, rows], np.asarray(want)[:, rows], atol=1e-5)


def test_blockwise_takes_a_traced_mask_under_jit():
    q, k, v = _qkv(5, 12, seed=1)

    @jax.jit
    def run(fill):
        valid = jnp.concatenate([jnp.arange(7) < fill, jnp.ones(5, bool)])
        mask = AttentionMask.create(jnp.zeros(5, jnp.int32), jnp.zeros(12, jnp.int32), kv_valid=valid)
        return (attention_lib.get_attention("blockwise", attention_lib.KernelOptions(2, 3))(q, k, v, mask),
                attention_lib.get_attention("dot_product")(q, k, v, mask))

    for fill in (0, 4, 7):
        got, want = run(fill)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_teacher_forcing_rule_sees_what_dreamzero_sees():
    # Two chunks, two tokens each, clean copy then noisy copy.
    mask = AttentionMask.create(np.array([0, 0, 1, 1, 0, 0, 1, 1]), q_copy=np.repeat([0, 1], 4),
                                rule="teacher_forcing").dense_numpy()
    clean, noisy = slice(0, 4), slice(4, 8)
    # Clean chunks: chunk-causal over the clean copy, blind to the noisy copy.
    np.testing.assert_array_equal(mask[clean, clean], np.array([[1, 1, 0, 0]] * 2 + [[1, 1, 1, 1]] * 2, bool))
    assert not mask[clean, noisy].any()
    # Noisy chunk i: clean chunks before i, and its own noisy tokens only.
    np.testing.assert_array_equal(mask[noisy, clean], np.array([[0, 0, 0, 0]] * 2 + [[1, 1, 0, 0]] * 2, bool))
    np.testing.assert_array_equal(mask[noisy, noisy], np.array([[1, 1, 0, 0]] * 2 + [[0, 0, 1, 1]] * 2, bool))


def test_layout_mask_is_ids_and_hides_padding_from_valid_tokens():
    cfg = ModelConfig.from_dict({**SIZES["tiny"], "attention_layout": "chunk_causal"})
    layout = make_token_layout(cfg, (3, 4, 4), num_action_tokens=8, num_proprio_tokens=1, pad_to_multiple=16)
    mask = layout_attention_mask(layout)
    assert layout.num_padding_tokens > 0
    assert mask.is_static and np.shape(mask.q_chunk) == (layout.length,)
    dense = attention_mask(layout)
    valid = layout.token_valid
    assert not dense[valid][:, ~valid].any()
    assert dense[~valid].any(axis=1).all()  # padding rows stay finite
    chunk = layout.token_chunk
    np.testing.assert_array_equal(dense[np.ix_(valid, valid)], (chunk[valid][None] <= chunk[valid][:, None]))
    # Bidirectional without padding needs no mask at all.
    bidirectional = dataclasses.replace(cfg, attention_layout="bidirectional")
    assert layout_attention_mask(make_token_layout(bidirectional, (3, 4, 4))) is None


def test_model_forward_with_blockwise_equals_dot_product_and_holds_no_square_array():
    base = ModelConfig.from_dict({**SIZES["tiny"], "attention_layout": "chunk_causal", "num_layers": 1})
    latent_shape, num_actions = (3, 4, 4, 16), 8
    params = wam.init_params(base, jax.random.key(0), latent_shape, 5, num_actions)
    inputs = wam.example_inputs(base, latent_shape, 5, num_actions, batch=2)
    rng = np.random.default_rng(0)
    inputs = {k: jnp.asarray(rng.normal(size=x.shape), x.dtype) for k, x in inputs.items()}
    # Teacher-forced (the clean copy of chunk 1 joins the sequence): the teacher_forcing rule, block by block.
    history = {"history_latents": inputs["latents"] + 1.0, "history_actions": inputs["actions"] - 1.0}
    outputs, texts = {}, {}
    for kernel in ("dot_product", "blockwise"):
        cfg = dataclasses.replace(base, attention=kernel, attention_block_q=16, attention_block_kv=16)
        lowered = jax.jit(lambda p, *, cfg=cfg, **x: wam.wam_forward(cfg, p, pad_to_multiple=16, **x)).lower(
            params, **inputs, **history)
        texts[kernel] = lowered.as_text()
        outputs[kernel] = lowered.compile()(params, **inputs, **history)
    for want, have in zip(outputs["dot_product"], outputs["blockwise"], strict=True):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), atol=1e-5)
    s = 3 * 2 * 2 + num_actions + 1 + 2 * 2 + num_actions // 2
    s += -s % 16
    square = f"{s}x{s}x"
    assert square not in texts["blockwise"]
    assert square in texts["dot_product"]  # the check can fail: dot_product does hold [S, S]


def test_kernel_resolution_names_the_choice_and_rejects_bad_settings():
    assert attention_lib.resolve_attention("auto", "cpu", "float32") == "blockwise"
    assert attention_lib.resolve_attention("auto", "gpu", "bfloat16") == "cudnn"
    assert attention_lib.resolve_attention("auto", "gpu", "float32") == "blockwise"
    assert attention_lib.resolve_attention("cudnn", "cpu", "bfloat16") == "xla"
    with pytest.raises(ValueError, match=r"model.dtype"):
        attention_lib.resolve_attention("cudnn", "gpu", "float32")
    with pytest.raises(ValueError, match=r"model.attention='flash3'"):
        attention_lib.resolve_attention("flash3", "cpu", "float32")
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match=r"model.attention_block_q=0"):
        attention_lib.get_attention("blockwise", attention_lib.KernelOptions(block_q=0))(q, k, v, None)
    with pytest.raises(ValueError, match=r"rule 'sliding'"):
        AttentionMask.create(np.zeros(4), rule="sliding")


def test_splash_equals_dot_product_in_interpret_mode_and_skips_masked_blocks():
    # Pallas interpret mode on CPU: key blocks must still be multiples of 128 lanes, so S=200 pads to 256.
    chunk = np.repeat(np.arange(4), 50)
    valid = np.arange(200) < 190
    mask = AttentionMask.create(np.where(valid, chunk, PADDING_CHUNK), kv_valid=valid)
    q, k, v = (x[:1] for x in _qkv(200, 200, seed=2))
    reference = _value_and_grads(attention_lib.get_attention("dot_product"), q, k, v, mask)
    got = _value_and_grads(attention_lib.get_attention("splash", attention_lib.KernelOptions(64, 128)), q, k, v, mask)
    # Splash accumulates in its own order; its gradients (read-out weights up to 200) agree to ~1e-4 relative.
    for want, have in zip(jax.tree.leaves(reference), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), atol=1e-4, rtol=1e-4)
    # The splash mask is read block by block from the ids: chunk 0-1 queries never visit the last key block.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info

    from wamjax.models.splash import IdBlockMask, _pad_mask

    padded = IdBlockMask(_pad_mask(mask, 200, 200, 56, 56))
    info, _ = mask_info.process_mask(splash_mask.MultiHeadMask([padded]), (64, 128))
    block_kind = np.asarray(info.block_mask)[0]  # 0 empty (skipped), 1 partial, 2 full
    assert block_kind[0, 1] == 0 and block_kind[2, 0] == 2 and block_kind[2, 1] == 1


def test_splash_under_shard_map_on_a_mesh_equals_dot_product():
    import flax.linen as nn
    import ml_collections

    from wamjax.parallel.mesh import DEFAULT_RULES, make_mesh

    chunk = np.repeat(np.arange(4), 50)
    valid = np.arange(200) < 190
    mask = AttentionMask.create(np.where(valid, chunk, PADDING_CHUNK), kv_valid=valid)
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 200, 4, HEAD_DIM)), jnp.float32) for _ in range(3))
    want = attention_lib.get_attention("dot_product")(q, k, v, mask)
    # Batch over fsdp, heads over tensor x sequence (the context-parallel layout): 8 kernels of 1 x 1 heads.
    mesh = make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2}), jax.devices()[:8])
    splash = attention_lib.get_attention("splash", attention_lib.KernelOptions(64, 128))
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(DEFAULT_RULES)):
        got = jax.jit(lambda q, k, v: splash(q, k, v, mask))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
