"""Pallas splash attention (TPU) under `shard_map`, with the layout's mask as a block-sparse splash mask.

The splash mask is a lazy `Mask` that evaluates the `AttentionMask` rule on the id slices of one block at a
time: splash's mask processing classifies every (q block, kv block) pair as empty (skipped, never computed),
full (no mask work) or partial (its block stored once, deduplicated), so no [S, S] array is built on the host
or the device, even at 75k tokens. Off TPU the same kernel runs in Pallas interpret mode (slow; for tests).

Batch shards over the `batch` rule's mesh axes and heads over the `heads` rule's (`attn_heads` under context
parallelism), each device running the kernel on its local batch and heads over the whole sequence.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from wamjax.models.attention_mask import MASK_RULES, AttentionMask
from wamjax.parallel import context as context_parallel

_TPU_BLOCK = 128


class IdBlockMask(splash_mask.Mask):
    """A splash mask read block by block from a static `AttentionMask` (per-token ids and a rule)."""

    def __init__(self, mask: AttentionMask):
        if not mask.is_static:
            raise ValueError("splash attention needs a static mask (ids from a layout), not traced ids")
        self.mask = mask

    @property
    def shape(self) -> tuple[int, int]:
        return (self.mask.q_length, self.mask.kv_length)

    def __getitem__(self, idx) -> np.ndarray:
        q_slice, kv_slice = idx
        m = self.mask
        allowed = MASK_RULES[m.rule](m.q_chunk[q_slice, None], m.q_copy[q_slice, None],
                                     m.kv_chunk[None, kv_slice], m.kv_copy[None, kv_slice])
        return np.asarray(allowed) & m.kv_valid[None, kv_slice]

    def _key(self) -> tuple:
        m = self.mask
        return (m.rule, *(np.asarray(getattr(m, f)).tobytes() for f in ("q_chunk", "kv_chunk", "q_copy",
                                                                         "kv_copy", "kv_valid")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdBlockMask) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def block_size(size: int, length: int) -> int:
    """The block size used for `length` tokens: the configured one, or less for short sequences (splash
    needs key blocks in multiples of 128 lanes, in interpret mode too)."""
    return min(size, -(-length // _TPU_BLOCK) * _TPU_BLOCK)


def _pad_mask(mask: AttentionMask | None, sq: int, sk: int, pad_q: int, pad_k: int) -> AttentionMask:
    if mask is None:
        mask = AttentionMask.create(np.zeros(sq, np.int32), np.zeros(sk, np.int32))
    pad = lambda a, n, value=0: np.pad(np.asarray(a), (0, n), constant_values=value)
    return AttentionMask(pad(mask.q_chunk, pad_q), pad(mask.kv_chunk, pad_k), pad(mask.q_copy, pad_q),
                         pad(mask.kv_copy, pad_k), pad(mask.kv_valid, pad_k, False), mask.rule)


def _dividing(axes: tuple, shape: tuple[int, ...], mesh: jax.sharding.AbstractMesh) -> tuple:
    """`axes` with each dimension's mesh axes kept only where their size divides it (a batch of 1 at
    initialization, say, stays whole)."""
    if mesh.empty:
        return tuple(axes)
    out = []
    for size, entry in zip(shape, axes, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        total = 1
        for name in names:
            total *= mesh.shape[name]
        out.append(entry if size % total == 0 else None)
    return tuple(out)


def padded_mask(mask: AttentionMask | None, sq: int, sk: int, block_q: int, block_kv: int
                ) -> tuple[AttentionMask, int, int]:
    """(the mask padded to whole blocks, query block, key block) that `attention` runs for sq x sk tokens."""
    bq, bk = block_size(block_q, sq), block_size(block_kv, sk)
    return _pad_mask(mask, sq, sk, -sq % bq, -sk % bk), bq, bk


def make_kernel(mask: AttentionMask, bq: int, bk: int, heads: int, interpret: bool
                ) -> splash_kernel.SplashAttentionKernel:
    """The splash kernel of one example's `heads` heads for a `padded_mask`; its mask infos (`fwd_mask_info`,
    `dkv_mask_info`) say which block pairs it skips."""
    block_sizes = splash_kernel.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk,
        block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk,
    )
    return splash_kernel.make_splash_mha(
        mask=splash_mask.MultiHeadMask([IdBlockMask(mask)] * heads), block_sizes=block_sizes,
        head_shards=1, q_seq_shards=1, interpret=interpret,
    )


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, block_q: int,
              block_kv: int) -> jax.Array:
    """Splash attention of q [B, Sq, H, D] over k, v [B, Sk, H, D] under a static `mask`."""
    sq, sk = q.shape[1], k.shape[1]
    mask, bq, bk = padded_mask(mask, sq, sk, block_q, block_kv)
    pad_q, pad_k = mask.q_length - sq, mask.kv_length - sk
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
    # Splash takes [H, S, D] per example and does not scale the logits itself.
    to_heads_major = lambda x: jnp.swapaxes(x, 1, 2)
    q = to_heads_major(pad(q * q.shape[-1] ** -0.5, pad_q))
    k, v = to_heads_major(pad(k, pad_k)), to_heads_major(pad(v, pad_k))
    interpret = context_parallel.target_backend() != "tpu"
    heads_axis = "attn_heads" if context_parallel.all_to_all_heads(q.shape[1]) else "heads"
    mesh = jax.sharding.get_abstract_mesh()
    spec = PartitionSpec(*_dividing(nn.logical_to_mesh_axes(("batch", heads_axis, None, None)), q.shape, mesh))

    def local(q, k, v):
        return jax.vmap(make_kernel(mask, bq, bk, q.shape[1], interpret))(q, k, v)

    if mesh.empty or all(a is None for a in spec):
        out = local(q, k, v)
    else:
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    return jnp.swapaxes(out, 1, 2)[:, :sq]
