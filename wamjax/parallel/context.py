"""Context parallelism over the `sequence` mesh axis by all-to-all (sequence <-> heads), as Ulysses / Wan do.

Outside attention, activations are sharded along their length over `sequence`. Self-attention needs every
key for each query, so around the kernel the `sequence` axis moves from the length dimension to the heads
dimension (`ATTENTION_AXES`: logical `attn_length` unsharded, `attn_heads` over tensor x sequence); GSPMD
lowers each move to one all-to-all. Each device then runs the kernel over the whole sequence for its share of
heads, so nothing [S, S] is gathered, and with a block kernel (`blockwise`, `splash`) nothing [S, S] exists.

When the heads do not divide over tensor x sequence, attention falls back to gathering keys and values over
the sequence axis (each device: its queries against all keys), said once in the log.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
from absl import logging

ATTENTION_AXES = ("batch", "attn_length", "attn_heads", "kv")


def mesh_axes_size(logical: str) -> int:
    """How many shards the current mesh and logical rules give a dimension named `logical` (1 off-mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes((logical,))[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


@functools.cache
def _warn_fallback(heads: int, shards: int) -> None:
    logging.warning(
        "context parallelism: %d attention heads do not divide over %d tensor x sequence shards; self-attention "
        "gathers keys/values over the sequence axis instead (set mesh.sequence to a divisor of the heads)",
        heads, shards,
    )


def all_to_all_heads(num_heads: int) -> bool:
    """True when self-attention should run in `ATTENTION_AXES` (the length is sharded and the heads divide)."""
    if mesh_axes_size("length") == 1:
        return False
    shards = mesh_axes_size("attn_heads")
    if num_heads % shards:
        _warn_fallback(num_heads, shards)
        return False
    return True


def target_backend() -> str:
    """The platform the program is built for: that of the mesh set with `jax.set_mesh` (a TPU topology when
    compiling for a pod from a CPU), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None or not device.platform else device.platform
