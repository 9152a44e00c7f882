"""Device mesh from config, the logical-axis rule table, and array placement helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis name -> mesh axes, in priority order: an earlier rule claims a mesh axis first, and a logical
# name may have several rules, the first whose mesh axes are still free winning. So in activations
# ("batch", "length", "embed") the batch takes fsdp and embed stays whole, while in parameters (no batch axis)
# embed is FSDP-sharded. Kernels shard embed over fsdp and heads/mlp over tensor; the bias and norm vectors,
# which have no embed axis, shard over fsdp too, so per-device parameter bytes fall as 1/fsdp even at
# hundreds of devices (replicated, they would add ~15% to Wan-1.3B's per-device state at fsdp=256).
# Parameters shard over fsdp and sequence together (embed over both, as MaxText does), so a sequence-parallel
# mesh holds no more state per device than an fsdp-only one; activations keep sequence for their length.
# `attn_heads` / `attn_length` are self-attention's layout under context parallelism (parallel/context.py).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", ("fsdp", "sequence")),
    ("embed", "fsdp"),
    ("heads", ("tensor", "fsdp", "sequence")),
    ("heads", ("tensor", "fsdp")),
    ("heads", "tensor"),
    ("mlp", ("tensor", "fsdp", "sequence")),
    ("mlp", ("tensor", "fsdp")),
    ("mlp", "tensor"),
    ("norm", ("fsdp", "sequence")),
    ("norm", "fsdp"),
    ("attn_heads", ("tensor", "sequence")),
    ("attn_heads", "tensor"),
    ("attn_length", None),
    ("kv", None),
    ("kv_length", None),
    ("text_length", None),
    ("text_embed", None),
    ("image_length", None),
    ("image_embed", None),
    ("mlp_small", None),
    ("layers", None),
    ("action", None),
)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves the (data, fsdp, tensor, sequence) sizes; one size may be -1 to take the remaining devices."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices; {num_devices} present"
        )
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types, multi-slice aware via `mesh.dcn_*`."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = [int(mesh_config.get(f"dcn_{a}", 1)) for a in MESH_AXES]
    num_slices = math.prod(dcn)
    if num_slices > 1:
        ici = mesh_shape(mesh_config, len(devices) // num_slices)
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        shape = mesh_shape(mesh_config, len(devices))
        try:
            device_array = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError):
            device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(rules_config: Any = None) -> tuple[tuple[str, Any], ...]:
    """The rule table from config (a sequence of [logical, mesh] pairs), or the defaults."""
    if not rules_config:
        return DEFAULT_RULES
    return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in rules_config)


def batch_sharding(mesh: Mesh, rules: Sequence, ndim: int) -> NamedSharding:
    """Sharding of a host batch array: leading batch axis over the batch rule's mesh axes."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), list(rules))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
