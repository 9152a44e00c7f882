"""Attention kernels behind one signature, selected by a config string.

Every kernel takes q [B, Sq, H, D], k and v [B, Sk, H, D] and an optional boolean mask broadcastable to
[B, H, Sq, Sk] (True = attend), and returns [B, Sq, H, D].
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Registers an attention kernel under `name`."""

    def wrap(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        return fn

    return wrap


def get_attention(name: str) -> AttentionFn:
    """Returns the kernel registered as `name`, naming the known ones on a miss."""
    if name not in _REGISTRY:
        raise ValueError(f"model.attention={name!r} is not a known attention kernel; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


@register_attention("dot_product")
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Plain softmax attention with float32 logits; runs on every backend."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@register_attention("xla")
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention` with XLA's own lowering (any backend)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


@register_attention("cudnn")
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """cuDNN flash attention on NVIDIA GPUs; falls back to the XLA lowering on other backends."""
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
