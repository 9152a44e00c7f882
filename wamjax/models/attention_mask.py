"""Attention masks described by per-token ids, evaluated inside the kernels block by block.

A mask is never an [Sq, Sk] constant: it is a few int32/bool vectors (one entry per query or key token) and
a named rule. A kernel asks for the boolean block it is about to compute (`mask.block(...)`), which the
rule evaluates with broadcast comparisons of id slices, so the program holds O(S) ids and never an [S, S]
array (except in kernels that materialize [S, S] logits anyway, like `dot_product`).

Rules (q sees k iff `rule(q ids, k ids)` and `kv_valid[k]`):
- `chunk_causal`: k's chunk <= q's chunk, within the same copy. All chunk ids equal is bidirectional.
- `teacher_forcing`: two copies of the chunks in one sequence (copy 0 clean, copy 1 noisy). Clean chunks see
  clean chunks up to their own; noisy chunk i sees clean chunks before i and noisy tokens of chunk i (its own
  frames and its action/state tokens).
A new layout is a new entry in `MASK_RULES`; kernels' signatures stay the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = np.ndarray | jax.Array
# (q_chunk [Q, 1], q_copy [Q, 1], kv_chunk [1, K], kv_copy [1, K]) -> bool [Q, K]
MaskRule = Callable[[ArrayLike, ArrayLike, ArrayLike, ArrayLike], ArrayLike]


def _chunk_causal(q_chunk, q_copy, kv_chunk, kv_copy):
    return (kv_chunk <= q_chunk) & (kv_copy == q_copy)


def _teacher_forcing(q_chunk, q_copy, kv_chunk, kv_copy):
    clean_q, clean_k = q_copy == 0, kv_copy == 0
    sees_clean = clean_k & ((clean_q & (kv_chunk <= q_chunk)) | (~clean_q & (kv_chunk < q_chunk)))
    sees_own_noisy = ~clean_q & ~clean_k & (kv_chunk == q_chunk)
    return sees_clean | sees_own_noisy


MASK_RULES: dict[str, MaskRule] = {"chunk_causal": _chunk_causal, "teacher_forcing": _teacher_forcing}

# Chunk id of padding tokens: larger than any real chunk, so padding queries see every valid key.
PADDING_CHUNK = np.iinfo(np.int32).max // 2


def allowed_block(rule: str, q_ids: dict[str, jax.Array], kv_ids: dict[str, jax.Array]) -> jax.Array:
    """bool [Q, K]: which of Q queries see which of K keys, from the id slices of `AttentionMask.q_ids` /
    `kv_ids` and the rule's name."""
    allowed = MASK_RULES[rule](
        q_ids["q_chunk"][:, None], q_ids["q_copy"][:, None], kv_ids["kv_chunk"][None], kv_ids["kv_copy"][None]
    )
    return allowed & kv_ids["kv_valid"][None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, as per-token ids: q_* are [Sq], kv_* are [Sk].

    Valid queries never see invalid keys; padding queries (discarded by the caller) may see any valid key,
    which keeps their rows finite. Fields may be numpy (static, from a layout) or traced arrays (a KV cache's
    fill level).
    """

    q_chunk: ArrayLike  # int32 [Sq]
    kv_chunk: ArrayLike  # int32 [Sk]
    q_copy: ArrayLike  # int32 [Sq]: 0 = the sequence's only (or clean) copy, 1 = the noisy copy
    kv_copy: ArrayLike  # int32 [Sk]
    kv_valid: ArrayLike  # bool [Sk]: False for padding / unused cache slots
    rule: str = dataclasses.field(default="chunk_causal", metadata={"static": True})

    def __post_init__(self):
        if self.rule not in MASK_RULES:
            raise ValueError(f"attention mask rule {self.rule!r} is not known; known: {sorted(MASK_RULES)}")

    @classmethod
    def create(
        cls,
        q_chunk: ArrayLike,
        kv_chunk: ArrayLike | None = None,
        kv_valid: ArrayLike | None = None,
        q_copy: ArrayLike | None = None,
        kv_copy: ArrayLike | None = None,
        rule: str = "chunk_causal",
    ) -> AttentionMask:
        """A mask from chunk ids; keys default to the queries' ids (self-attention), all valid, one copy."""
        xp = jnp if any(isinstance(a, jax.Array) for a in (q_chunk, kv_chunk, kv_valid)) else np
        q_chunk = xp.asarray(q_chunk, xp.int32)
        kv_chunk = q_chunk if kv_chunk is None else xp.asarray(kv_chunk, xp.int32)
        if kv_valid is None:
            kv_valid = xp.ones(kv_chunk.shape, bool)
        q_copy = xp.zeros(q_chunk.shape, xp.int32) if q_copy is None else xp.asarray(q_copy, xp.int32)
        if kv_copy is None:
            kv_copy = q_copy if kv_chunk is q_chunk else xp.zeros(kv_chunk.shape, xp.int32)
        mask = cls(q_chunk, kv_chunk, q_copy, xp.asarray(kv_copy, xp.int32), xp.asarray(kv_valid, bool), rule)
        for name in ("q_chunk", "kv_chunk", "q_copy", "kv_copy", "kv_valid"):
            if np.ndim(getattr(mask, name)) != 1:
                raise ValueError(f"AttentionMask.{name} must be a vector; got shape {np.shape(getattr(mask, name))}")
        if mask.q_copy.shape != mask.q_chunk.shape or not (mask.kv_copy.shape == mask.kv_valid.shape
                                                              == mask.kv_chunk.shape):
            raise ValueError("AttentionMask: q_* vectors must share a length, and so must kv_* vectors")
        return mask

    @property
    def q_length(self) -> int:
        return int(self.q_chunk.shape[0])

    @property
    def kv_length(self) -> int:
        return int(self.kv_chunk.shape[0])

    @property
    def is_static(self) -> bool:
        """True when every id is a concrete numpy array (built from a static layout)."""
        return all(isinstance(getattr(self, f), np.ndarray)
                   for f in ("q_chunk", "kv_chunk", "q_copy", "kv_copy", "kv_valid"))

    def block(self, q_ids: dict[str, jax.Array], kv_ids: dict[str, jax.Array]) -> jax.Array:
        """bool [Q, K] from id slices (`q_chunk`, `q_copy` of length Q; `kv_chunk`, `kv_copy`, `kv_valid`)."""
        return allowed_block(self.rule, q_ids, kv_ids)

    def q_ids(self) -> dict[str, jax.Array]:
        """The query-side id vectors, as arrays a kernel can slice."""
        return {"q_chunk": jnp.asarray(self.q_chunk), "q_copy": jnp.asarray(self.q_copy)}

    def kv_ids(self) -> dict[str, jax.Array]:
        """The key-side id vectors, as arrays a kernel can slice."""
        return {"kv_chunk": jnp.asarray(self.kv_chunk), "kv_copy": jnp.asarray(self.kv_copy),
                "kv_valid": jnp.asarray(self.kv_valid)}

    def dense(self) -> jax.Array:
        """bool [Sq, Sk] (query, key): the reference the kernels are tested against."""
        return self.block(self.q_ids(), self.kv_ids())

    def dense_numpy(self) -> np.ndarray:
        """`dense()` evaluated with numpy (static masks only), for host-side checks."""
        if not self.is_static:
            raise ValueError("dense_numpy() needs a static mask; this one holds traced ids")
        allowed = MASK_RULES[self.rule](self.q_chunk[:, None], self.q_copy[:, None], self.kv_chunk[None],
                                        self.kv_copy[None])
        return np.asarray(allowed) & self.kv_valid[None]


def cached_chunk_mask(chunk_tokens: int, capacity: int, visible: ArrayLike | int) -> AttentionMask:
    """Self-attention of one chunk's `chunk_tokens` queries over a KV cache of `capacity` slots followed by the
    chunk's own keys: every cached token is in an earlier chunk, so one chunk id serves all, and only the first
    `visible` slots (a traced fill level, or a number) are valid."""
    xp = jnp if isinstance(visible, jax.Array) else np
    valid = xp.concatenate([xp.arange(capacity) < visible, xp.ones(chunk_tokens, bool)])
    return AttentionMask.create(xp.zeros(chunk_tokens, xp.int32), xp.zeros(capacity + chunk_tokens, xp.int32),
                                kv_valid=valid)
