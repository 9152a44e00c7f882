"""Small building blocks shared by the DiT and the action modules, with logical axis names."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype
LogicalAxes = tuple[str | None, ...]


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Annotates an activation with logical axis names (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, axes)


def recomputed(fn):
    """`fn` with its intermediates recomputed in the backward pass instead of kept: for elementwise chains
    (norms, modulation, RoPE) whose float32 temporaries cost far more memory than redoing them."""
    return jax.checkpoint(fn)


class Dense(nn.Module):
    """A linear layer whose kernel and bias carry logical axis names (torch Linear semantics); with `lora_rank` > 0
    a low-rank adapter beside the kernel: y = x K + lora_scale * (x A) B, A [in, r] random, B [r, out] zero, so an
    untrained adapter changes nothing (PEFT's initialization)."""

    features: int
    kernel_axes: LogicalAxes = (None, None)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.kernel_axes),
            (fan_in, self.features),
            self.param_dtype,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=self.dtype)
        if self.lora_rank > 0:
            a = self.param(
                "lora_a",
                nn.with_logical_partitioning(nn.initializers.he_uniform(), (self.kernel_axes[0], None)),
                (fan_in, self.lora_rank),
                self.param_dtype,
            )
            b = self.param(
                "lora_b",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, self.kernel_axes[-1])),
                (self.lora_rank, self.features),
                self.param_dtype,
            )
            low = jnp.dot(x.astype(self.dtype), a.astype(self.dtype), preferred_element_type=self.dtype)
            y = y + self.lora_scale * jnp.dot(low, b.astype(self.dtype), preferred_element_type=self.dtype)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[-1:]),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMS normalization over the last axis with a learned scale, computed in float32."""

    eps: float = 1e-6
    axis_name: str | None = "heads"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            jnp.float32,
        )
        return _rms_norm(x, scale, self.eps)


@recomputed
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps)


@recomputed
def _affine_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    return _normalize(x, eps) * scale + bias


def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, then adaLN modulation `* (1 + scale) + shift`, in float32."""
    return _normalize(x, eps) * (1 + scale) + shift


modulated_layer_norm = recomputed(modulate)


class LayerNorm(nn.Module):
    """Layer normalization in float32, optionally with learned scale and bias (torch LayerNorm semantics)."""

    eps: float = 1e-6
    affine: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.affine:
            scale = self.param(
                "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],)
            )
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (x.shape[-1],)
            )
            return _affine_layer_norm(x, scale, bias, self.eps)
        return recomputed(_normalize)(x, self.eps)


def sinusoidal_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features [..., dim] ordered (cos, sin), as diffusers' Timesteps(flip_sin_to_cos=True)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = timesteps.astype(jnp.float32)[..., None] * jnp.exp(exponent)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


class MLP2(nn.Module):
    """Linear -> activation -> linear, named `linear_1`/`linear_2` like diffusers' embedding MLPs."""

    hidden: int
    out: int
    activation: str = "silu"
    axes_in: LogicalAxes = (None, "embed")
    axes_out: LogicalAxes = ("mlp_small", "embed")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.hidden, self.axes_in, dtype=self.dtype, name="linear_1")(x)
        x = activation_fn(self.activation)(x)
        return Dense(self.out, self.axes_out, dtype=self.dtype, name="linear_2")(x)


def activation_fn(name: str):
    """Returns the activation called `name` (silu, gelu_tanh, gelu)."""
    table = {
        "silu": jax.nn.silu,
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
    return table[name]


def rope_frequencies(axis_dim: int, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotary angles [len(positions), axis_dim // 2] for one axis, in float64 as Wan computes them."""
    inv = 1.0 / (theta ** (np.arange(0, axis_dim, 2, dtype=np.float64)[: axis_dim // 2] / axis_dim))
    return np.asarray(positions, np.float64)[:, None] * inv[None, :]
