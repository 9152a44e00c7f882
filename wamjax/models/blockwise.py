"""Memory-efficient attention in pure JAX: online softmax over key blocks for each query block, float32
accumulation, and a flash-style backward that recomputes each logit block from q, k and the saved per-row
log-sum-exp, so neither direction stores more than one [B, H, bq, bk] block of logits at a time.

Block sizes are balanced over the sequence (`balanced_block`); what is left is padded here (padded keys are
masked out, padded query rows are dropped). The mask comes from per-token ids (`AttentionMask`), sliced per block.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from wamjax.models.attention_mask import AttentionMask, allowed_block

Ids = dict[str, jax.Array] | None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, block_q: int,
              block_kv: int) -> jax.Array:
    """Softmax attention of q [B, Sq, H, D] over k, v [B, Sk, H, D] under `mask`, block by block."""
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"model.attention_block_q={block_q} and model.attention_block_kv={block_kv} must be >= 1")
    sq, sk = q.shape[1], k.shape[1]
    if mask is not None and (mask.q_length, mask.kv_length) != (sq, sk):
        raise ValueError(f"attention mask covers ({mask.q_length}, {mask.kv_length}) tokens; q, k have ({sq}, {sk})")
    bq, bk = balanced_block(sq, block_q), balanced_block(sk, block_kv)
    pad_q, pad_k = -sq % bq, -sk % bk
    skip_masked_blocks = mask is not None  # a mask made here only hides padded keys: no block pair is skipped
    if mask is None and pad_k:
        mask = AttentionMask.create(jnp.zeros(sq, jnp.int32), jnp.zeros(sk, jnp.int32))
    rule, q_ids, kv_ids = None, None, None
    if mask is not None:
        rule = mask.rule
        q_ids = {n: jnp.pad(a, (0, pad_q)) for n, a in mask.q_ids().items()}
        kv_ids = {n: jnp.pad(a, (0, pad_k)) for n, a in mask.kv_ids().items()}  # padded keys: kv_valid False
    # Head-major [B, H, S, D] inside: every block matmul is then a plain batched GEMM with no per-block transpose.
    pad = lambda x, n: jnp.swapaxes(jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x, 1, 2)
    out = _flash(pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), q_ids, kv_ids, rule, bq, bk, skip_masked_blocks)
    return jnp.swapaxes(out, 1, 2)[:, :sq]


def balanced_block(length: int, block: int) -> int:
    """The block size used for `length` tokens: as many blocks as `block` needs, made equal, rounded up to a
    multiple of 8 (1,280 tokens at 512 run as 3 blocks of 432, 1.2% padding, not 3 of 512, 20%)."""
    if length <= block:
        return length
    count = math.ceil(length / block)
    return min(block, 8 * math.ceil(math.ceil(length / count) / 8))


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, H, S, D] -> [S // size, B, H, size, D]."""
    b, h, s, d = x.shape
    return jnp.moveaxis(x.reshape(b, h, s // size, size, d), 2, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """[N, B, H, size, D] -> [B, H, N * size, D]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _id_blocks(ids: Ids, size: int) -> Ids:
    return None if ids is None else {n: a.reshape(-1, size) for n, a in ids.items()}


def _logits(qi, kj, qid, kid, rule, scale):
    """Masked float32 logits [B, H, bq, bk] of one block pair; masked entries are -inf."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32) * scale
    if rule is not None:
        s = jnp.where(allowed_block(rule, qid, kid)[None, None], s, -jnp.inf)
    return s


# Set by `counting_branches` while a program is traced: the tally its block-pair branches report to.
_branch_tally: collections.Counter | None = None


@contextlib.contextmanager
def counting_branches() -> Iterator[collections.Counter]:
    """Counts the block pairs the kernel computes and skips, as they run, for programs traced inside it.

    Each block pair's `lax.cond` reports the branch it takes through a host callback to the yielded counter:
    keys ("forward" | "backward", "computed" | "skipped"). A debugging aid for checking FLOP counts against
    the kernel's real decisions; programs traced outside it carry no callbacks.
    """
    global _branch_tally
    previous, _branch_tally = _branch_tally, collections.Counter()
    try:
        yield _branch_tally
    finally:
        _branch_tally = previous


def _tallied(branch, key):
    tally = _branch_tally
    if tally is None:
        return branch

    def run(operand):
        jax.debug.callback(lambda: tally.update([key]))
        return branch(operand)

    return run


def _if_visible(rule, skip, qid, kid, compute, skipped, operand, phase):
    """`compute(operand)` when any query of the block pair sees any key, else `skipped(operand)`: fully masked
    block pairs (a later chunk's keys, padding) cost no matmuls. Without `skip`, always `compute`."""
    if rule is None or not skip:
        return _tallied(compute, (phase, "computed"))(operand)
    return jax.lax.cond(allowed_block(rule, qid, kid).any(), _tallied(compute, (phase, "computed")),
                        _tallied(skipped, (phase, "skipped")), operand)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_ids: Ids, kv_ids: Ids, rule: str | None, bq: int, bk: int, skip: bool) -> jax.Array:
    return _forward(q, k, v, q_ids, kv_ids, rule, bq, bk, skip)[0]


def _forward(q, k, v, q_ids, kv_ids, rule, bq, bk, skip):
    scale = q.shape[-1] ** -0.5
    kb, vb, kid_b = _blocks(k, bk), _blocks(v, bk), _id_blocks(kv_ids, bk)

    def per_query_block(args):
        qi, qid = args
        b, h, _, d = qi.shape

        def update(carry, kj, vj, kid):
            m, total, acc = carry
            s = _logits(qi, kj, qid, kid, rule, scale)
            m_new = jnp.maximum(m, s.max(-1))
            # Rows with nothing visible yet keep m = -inf; shift them by 0 so exp gives 0, not NaN.
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            total = total * correction + p.sum(-1)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            acc = acc * correction[..., None] + pv
            return m_new, total, acc

        def step(carry, kv):
            kj, vj, kid = kv
            return _if_visible(rule, skip, qid, kid, lambda c: update(c, kj, vj, kid), lambda c: c, carry,
                               "forward"), None

        init = (jnp.full((b, h, bq), -jnp.inf, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, h, bq, d), jnp.float32))
        (m, total, acc), _ = jax.lax.scan(step, init, (kb, vb, kid_b))
        seen = total > 0
        safe_total = jnp.where(seen, total, 1.0)
        out = acc / safe_total[..., None]
        lse = jnp.where(seen, m + jnp.log(safe_total), 0.0)
        return out.astype(q.dtype), lse

    out_b, lse_b = jax.lax.map(per_query_block, (_blocks(q, bq), _id_blocks(q_ids, bq)))
    return _unblocks(out_b), (out_b, lse_b)


def _flash_fwd(q, k, v, q_ids, kv_ids, rule, bq, bk, skip):
    out, (out_b, lse_b) = _forward(q, k, v, q_ids, kv_ids, rule, bq, bk, skip)
    return out, (q, k, v, q_ids, kv_ids, out_b, lse_b)


def _flash_bwd(rule, bq, bk, skip, residuals, d_out):
    q, k, v, q_ids, kv_ids, out_b, lse_b = residuals
    scale = q.shape[-1] ** -0.5
    qb, kb, vb = _blocks(q, bq), _blocks(k, bk), _blocks(v, bk)
    dob = _blocks(d_out, bq)
    # delta_i = rowsum(dO_i * O_i): the softmax-backward term, [Nq, B, H, bq].
    delta_b = jnp.einsum("nbhqd,nbhqd->nbhq", dob.astype(jnp.float32), out_b.astype(jnp.float32))
    qid_b, kid_b = _id_blocks(q_ids, bq), _id_blocks(kv_ids, bk)

    def per_key_block(dq, kv):
        kj, vj, kid = kv

        def update(carry, qi, doi, lse, delta, qid):
            dk, dv = carry
            s = _logits(qi, kj, qid, kid, rule, scale)
            p = jnp.exp(s - lse[..., None])
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[..., None]) * scale).astype(qi.dtype)
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bhqk,bhkd->bhqd", ds, kj, preferred_element_type=jnp.float32)
            return (dk, dv), dqi

        def step(carry, qs):
            qi, _, _, _, qid = qs
            skipped = lambda c: (c, jnp.zeros(qi.shape, jnp.float32))
            return _if_visible(rule, skip, qid, kid, lambda c: update(c, *qs), skipped, carry, "backward")

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dk, dv), dq_parts = jax.lax.scan(step, (zeros, zeros), (qb, dob, lse_b, delta_b, qid_b))
        return dq + dq_parts, (dk, dv)

    dq, (dk_b, dv_b) = jax.lax.scan(per_key_block, jnp.zeros(qb.shape, jnp.float32), (kb, vb, kid_b))
    return (_unblocks(dq).astype(q.dtype), _unblocks(dk_b).astype(k.dtype), _unblocks(dv_b).astype(v.dtype),
            None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
