"""Attention kernels behind one signature, selected by a config string (`model.attention`).

Every kernel takes q [B, Sq, H, D], k and v [B, Sk, H, D] and an optional `AttentionMask` (per-token ids and a
rule, see `attention_mask.py`; None = every query sees every key), and returns [B, Sq, H, D]. Kernels build
the boolean mask inside the program from the id vectors, never from a host [Sq, Sk] constant.

Kernels: `dot_product` (plain softmax, float32 logits, [S, S] in memory), `xla` (`jax.nn.dot_product_attention`),
`blockwise` (online softmax over query/key blocks with a flash-style backward, every backend), `splash` (Pallas
splash attention on TPU, block-sparse over the mask; interpret mode elsewhere), `cudnn` (cuDNN flash attention,
GPU, bfloat16/float16), and `auto` (splash on TPU, cudnn on GPU, blockwise elsewhere), resolved once by
`resolve_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging

from wamjax.models import blockwise, splash
from wamjax.models.attention_mask import AttentionMask
from wamjax.parallel import context as context_parallel


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Tuning knobs of the block-based kernels (`model.attention_block_q` / `model.attention_block_kv`)."""

    block_q: int = 512
    block_kv: int = 512


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask | None], jax.Array]
KernelFn = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask | None, KernelOptions], jax.Array]
_REGISTRY: dict[str, KernelFn] = {}
AUTO = "auto"


def register_attention(name: str) -> Callable[[KernelFn], KernelFn]:
    """Registers an attention kernel `(q, k, v, mask, options) -> out` under `name`."""

    def wrap(fn: KernelFn) -> KernelFn:
        _REGISTRY[name] = fn
        return fn

    return wrap


def known_kernels() -> list[str]:
    """Names `model.attention` accepts."""
    return sorted([*_REGISTRY, AUTO])


def _check_name(name: str) -> None:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"model.attention={name!r} is not a known attention kernel; known: {known_kernels()}")


@functools.cache
def resolve_attention(name: str, backend: str, dtype: str) -> str:
    """The kernel that `model.attention=name` runs on `backend` with `model.dtype=dtype`; logs the choice once.

    `auto` is splash on TPU, cudnn on GPU in bfloat16/float16, and blockwise otherwise. `cudnn` needs a GPU
    and a 16-bit dtype: in float32 it is an error; off GPU it runs `xla`, said here once.
    """
    _check_name(name)
    half = dtype in ("bfloat16", "float16")
    if name == AUTO:
        chosen = {"tpu": "splash", "gpu": "cudnn" if half else "blockwise"}.get(backend, "blockwise")
        logging.info("model.attention=auto runs %r on backend %r with model.dtype=%s", chosen, backend, dtype)
        return chosen
    if name == "cudnn":
        if backend != "gpu":
            logging.warning("model.attention=cudnn needs a GPU; backend %r runs the 'xla' kernel instead", backend)
            return "xla"
        if not half:
            raise ValueError(
                f"model.attention='cudnn' needs model.dtype bfloat16 or float16, got model.dtype={dtype!r}; "
                "set model.dtype=bfloat16 or pick model.attention=blockwise"
            )
    logging.info("model.attention=%r on backend %r with model.dtype=%s", name, backend, dtype)
    return name


def get_attention(name: str, options: KernelOptions = KernelOptions()) -> AttentionFn:
    """The kernel registered as `name` (not `auto`), with `options` bound."""
    _check_name(name)
    if name == AUTO:
        raise ValueError("get_attention needs a concrete kernel; resolve model.attention='auto' first")
    return functools.partial(_REGISTRY[name], options=options)


def attention_for(cfg) -> AttentionFn:
    """The kernel a ModelConfig selects on the target backend, with its block sizes bound."""
    name = resolve_attention(cfg.attention, context_parallel.target_backend(), cfg.dtype)
    return get_attention(name, KernelOptions(cfg.attention_block_q, cfg.attention_block_kv))


def _dense_mask(mask: AttentionMask | None) -> jax.Array | None:
    """[1, 1, Sq, Sk] bool computed in the program from the mask's id vectors."""
    return None if mask is None else mask.dense()[None, None]


@register_attention("dot_product")
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None = None,
                          options: KernelOptions = KernelOptions()) -> jax.Array:
    """Plain softmax attention with float32 logits; runs on every backend and holds [B, H, Sq, Sk] logits."""
    del options
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(_dense_mask(mask), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@register_attention("xla")
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None = None,
                  options: KernelOptions = KernelOptions()) -> jax.Array:
    """`jax.nn.dot_product_attention` with XLA's own lowering (any backend)."""
    del options
    return _jax_nn_attention(q, k, v, mask, "xla")


@register_attention("cudnn")
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None = None,
                    options: KernelOptions = KernelOptions()) -> jax.Array:
    """cuDNN flash attention (NVIDIA GPU, bfloat16/float16; `resolve_attention` routes other cases)."""
    del options
    return _jax_nn_attention(q, k, v, mask, "cudnn")


def _valid_key_count(mask: AttentionMask | None) -> int | None:
    """For a static mask that only hides trailing padding keys (every valid key visible to every query),
    the number of valid keys; else None."""
    if mask is None or not mask.is_static:
        return None
    count = int(mask.kv_valid.sum())
    if not mask.kv_valid[:count].all():
        return None
    valid_rows = mask.dense_numpy()[:, :count]
    return count if valid_rows.all() else None


def _jax_nn_attention(q, k, v, mask: AttentionMask | None, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention`; bidirectional + padding goes as key lengths (cuDNN's padding mode, no
    [S, S] mask), any other mask as a boolean mask built in the program."""
    count = _valid_key_count(mask)
    if count is not None:
        lengths = jnp.full((q.shape[0],), count, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=_dense_mask(mask), implementation=implementation)


@register_attention("blockwise")
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None = None,
                        options: KernelOptions = KernelOptions()) -> jax.Array:
    """Online-softmax attention over query and key blocks; never holds more than one [bq, bk] logit block
    per batch and head, forward or backward (see `blockwise.py`)."""
    return blockwise.attention(q, k, v, mask, options.block_q, options.block_kv)


@functools.cache
def _warn_once(message: str) -> None:
    logging.warning(message)


@register_attention("splash")
def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None = None,
                     options: KernelOptions = KernelOptions()) -> jax.Array:
    """Pallas splash attention under `shard_map`; fully masked blocks are skipped (see `splash.py`).

    A mask with traced ids (the KV cache's fill level) cannot become a static splash mask: those calls run
    `blockwise`, said once in the log.
    """
    if mask is not None and not mask.is_static:
        _warn_once("model.attention=splash: a mask with traced ids (KV cache) runs the blockwise kernel")
        return blockwise.attention(q, k, v, mask, options.block_q, options.block_kv)
    return splash.attention(q, k, v, mask, options.block_q, options.block_kv)
