"""Self-attention (query, key) pairs: those the mask lets a query see (model FLOPs) and those a kernel computes
(hardware FLOPs), counted exactly from per-token ids, never from an [S, S] mask.

A mask rule reads only the (chunk, copy) ids of a query and of a key and the key's validity, so tokens with
equal ids are interchangeable. Grouping queries into (chunk, copy) classes and keys into (chunk, copy, valid)
classes, the visible pairs are `query class sizes @ rule(class ids) @ key class sizes`: a few dozen classes for
any layout, whatever its length. A block kernel skips a (query block, key block) pair when no query of the
block sees any key of it; the classes present in each block decide that the same way.

Model FLOPs count the pairs a valid (non-padding) query sees. Hardware FLOPs count what the configured kernel
computes: every pair of the padded sequence for the dense kernels, and every pair of each block pair it does not
skip for the block kernels (a partially masked block counts whole).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from wamjax.models import blockwise, splash
from wamjax.models.attention_mask import MASK_RULES, AttentionMask, cached_chunk_mask
from wamjax.models.token_layout import TokenLayout, layout_attention_mask

DENSE_KERNELS = ("dot_product", "xla", "cudnn")  # every (query, key) pair of the sequence, masked or not
BLOCK_KERNELS = ("blockwise", "splash")  # skip (query block, key block) pairs with nothing visible


@dataclasses.dataclass(frozen=True)
class AttentionPairs:
    """(query, key) pairs of one self-attention call: seen under the mask, and computed by the kernel."""

    visible: int  # pairs of a valid query and a key the mask lets it see: what model FLOPs count
    computed: int  # pairs the kernel computes (padding and skipped blocks as the kernel handles them)
    dense: int  # queries x keys of the (unpadded-by-the-kernel) sequence: the count before masks were read
    kernel: str
    block_q: int = 0  # block sizes the kernel ran at (0 for dense kernels)
    block_kv: int = 0
    block_pairs: int = 0  # (query block, key block) pairs of the padded sequence (block kernels)
    skipped_block_pairs: int = 0  # of them, the ones the kernel skips

    @property
    def visible_fraction(self) -> float:
        return self.visible / self.dense


def _classes(*ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class ids [n_ids, C], class of each token [S], tokens per class [C]) of the distinct id tuples."""
    stacked = np.stack([np.asarray(a, np.int64) for a in ids])
    if stacked.shape[1] == 0:
        return stacked, np.zeros(0, np.int64), np.zeros(0, np.int64)
    unique, inverse, counts = np.unique(stacked, axis=1, return_inverse=True, return_counts=True)
    return unique, inverse.reshape(-1), counts


def _class_visibility(mask: AttentionMask, q_class: np.ndarray, k_class: np.ndarray) -> np.ndarray:
    """bool [Cq, Ck]: whether a query of each (chunk, copy) class sees a key of each (chunk, copy, valid) class."""
    allowed = MASK_RULES[mask.rule](q_class[0][:, None], q_class[1][:, None], k_class[0][None], k_class[1][None])
    return np.asarray(allowed) & k_class[2].astype(bool)[None]


def _static(mask: AttentionMask) -> AttentionMask:
    if not mask.is_static:
        raise ValueError("attention pairs are counted from a static mask (ids from a layout), not traced ids")
    return mask


def visible_pairs(mask: AttentionMask, q_valid: np.ndarray | None = None) -> int:
    """(query, key) pairs that `mask` lets a query see, counting only queries where `q_valid` (default: all)."""
    mask = _static(mask)
    q_valid = np.ones(mask.q_length, bool) if q_valid is None else np.asarray(q_valid, bool)
    if q_valid.shape != (mask.q_length,):
        raise ValueError(f"q_valid has shape {q_valid.shape}; expected ({mask.q_length},)")
    q_class, q_of, _ = _classes(mask.q_chunk[q_valid], mask.q_copy[q_valid])
    k_class, _, k_counts = _classes(mask.kv_chunk, mask.kv_copy, mask.kv_valid)
    q_counts = np.bincount(q_of, minlength=q_class.shape[1])
    return int(q_counts @ _class_visibility(mask, q_class, k_class).astype(np.int64) @ k_counts)


def _padded(mask: AttentionMask, pad_q: int, pad_k: int) -> AttentionMask:
    """The mask as the block kernels pad it: padded queries and keys get chunk 0 and copy 0, padded keys are
    invalid (`blockwise.attention`, `splash._pad_mask`)."""
    pad = lambda a, n, value=0: np.pad(np.asarray(a), (0, n), constant_values=value)
    return AttentionMask(pad(mask.q_chunk, pad_q), pad(mask.kv_chunk, pad_k), pad(mask.q_copy, pad_q),
                         pad(mask.kv_copy, pad_k), pad(mask.kv_valid, pad_k, False), mask.rule)


def visible_blocks(mask: AttentionMask, block_q: int, block_kv: int) -> np.ndarray:
    """bool [Sq // block_q, Sk // block_kv]: which block pairs of a mask (lengths multiples of the block sizes)
    hold at least one visible pair, the test a block-sparse kernel skips a block pair on."""
    mask = _static(mask)
    if mask.q_length % block_q or mask.kv_length % block_kv:
        raise ValueError(f"mask of ({mask.q_length}, {mask.kv_length}) tokens is not whole blocks of "
                         f"({block_q}, {block_kv})")
    q_class, q_of, _ = _classes(mask.q_chunk, mask.q_copy)
    k_class, k_of, _ = _classes(mask.kv_chunk, mask.kv_copy, mask.kv_valid)
    in_q_block = np.zeros((mask.q_length // block_q, q_class.shape[1]), np.int64)
    in_q_block[np.arange(mask.q_length) // block_q, q_of] = 1
    in_k_block = np.zeros((mask.kv_length // block_kv, k_class.shape[1]), np.int64)
    in_k_block[np.arange(mask.kv_length) // block_kv, k_of] = 1
    return (in_q_block @ _class_visibility(mask, q_class, k_class).astype(np.int64) @ in_k_block.T) > 0


def kernel_block_sizes(kernel: str, q_length: int, kv_length: int, block_q: int, block_kv: int) -> tuple[int, int]:
    """The (query, key) block sizes `kernel` runs at for these lengths and configured block sizes."""
    if kernel == "blockwise":
        return blockwise.balanced_block(q_length, block_q), blockwise.balanced_block(kv_length, block_kv)
    if kernel == "splash":
        return splash.block_size(block_q, q_length), splash.block_size(block_kv, kv_length)
    raise ValueError(f"kernel {kernel!r} has no blocks; block kernels: {BLOCK_KERNELS}")


def attention_pairs(mask: AttentionMask | None, q_length: int, kv_length: int, kernel: str, block_q: int = 512,
                    block_kv: int = 512, q_valid: np.ndarray | None = None) -> AttentionPairs:
    """The pairs one self-attention call of `kernel` (a resolved `model.attention`, not `auto`) sees and
    computes over q_length queries and kv_length keys under `mask` (None: every query sees every key).

    `q_valid` marks the queries that are the model's (default: all); padding queries are computed, not seen.
    """
    if kernel not in DENSE_KERNELS + BLOCK_KERNELS:
        raise ValueError(f"model.attention={kernel!r} has no FLOP count; known: {DENSE_KERNELS + BLOCK_KERNELS} "
                         "(resolve 'auto' first)")
    q_valid = np.ones(q_length, bool) if q_valid is None else np.asarray(q_valid, bool)
    if mask is not None and (mask.q_length, mask.kv_length) != (q_length, kv_length):
        raise ValueError(f"attention mask covers ({mask.q_length}, {mask.kv_length}) tokens; expected "
                         f"({q_length}, {kv_length})")
    dense = q_length * kv_length
    visible = int(q_valid.sum()) * kv_length if mask is None else visible_pairs(mask, q_valid)
    if kernel in DENSE_KERNELS:
        return AttentionPairs(visible, dense, dense, kernel)
    bq, bk = kernel_block_sizes(kernel, q_length, kv_length, block_q, block_kv)
    pad_q, pad_k = -q_length % bq, -kv_length % bk
    blocks = ((q_length + pad_q) // bq) * ((kv_length + pad_k) // bk)
    # blockwise skips only under a given mask (the one it makes for padded keys hides them, skips nothing);
    # splash always runs a mask and skips its empty blocks.
    skips = mask is not None or kernel == "splash"
    if not skips:
        return AttentionPairs(visible, blocks * bq * bk, dense, kernel, bq, bk, blocks, 0)
    if mask is None:
        mask = AttentionMask.create(np.zeros(q_length, np.int32), np.zeros(kv_length, np.int32))
    computed_blocks = int(visible_blocks(_padded(mask, pad_q, pad_k), bq, bk).sum())
    return AttentionPairs(visible, computed_blocks * bq * bk, dense, kernel, bq, bk, blocks, blocks - computed_blocks)


def layout_pairs(layout: TokenLayout, kernel: str, block_q: int = 512, block_kv: int = 512) -> AttentionPairs:
    """The pairs of a layout's self-attention (each block of the model runs one) with `kernel`: the mask and
    the padding the model gives it (`layout_attention_mask`)."""
    return attention_pairs(layout_attention_mask(layout), layout.length, layout.length, kernel, block_q, block_kv,
                           q_valid=layout.token_valid)


def cached_chunk_pairs(chunk_tokens: int, capacity: int, visible: int, kernel: str, block_q: int = 512,
                       block_kv: int = 512) -> AttentionPairs:
    """The pairs of one chunk's self-attention over a KV cache of `capacity` slots with `visible` of them
    attended (`cached_chunk.chunk_forward`): the chunk sees the visible cache and itself. The cache's fill level is
    traced, so `splash` runs `blockwise` there, deciding its skips on the device."""
    kernel = "blockwise" if kernel == "splash" else kernel
    mask = cached_chunk_mask(chunk_tokens, capacity, int(visible))
    return attention_pairs(mask, chunk_tokens, capacity + chunk_tokens, kernel, block_q, block_kv)
