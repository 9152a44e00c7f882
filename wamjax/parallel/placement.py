"""Putting arrays on the mesh: global batches from each process's host batch, and a start-up check that parameters
are placed as the sharding rules say, with per-device byte counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from wamjax.parallel.mesh import batch_sharding

# Tensors at least this large must be sharded when the rules shard one of their axes over a mesh axis > 1.
LARGE_TENSOR_BYTES = 1 << 20


class PlacementError(RuntimeError):
    """A large parameter ended up replicated although the rules shard it."""


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds for a pytree of (possibly sharded) arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        n = 1
        for d in shard_shape:
            n *= d
        total += n * leaf.dtype.itemsize
    return total


def check_placement(params: Any, shardings: Any, mesh: Mesh, log: Callable[[str], None] = print) -> int:
    """Logs per-device parameter bytes and raises PlacementError if a large tensor is replicated
    where its intended sharding splits it. Returns the per-device parameter bytes."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    for (path, leaf), intended in zip(flat, flat_shardings, strict=True):
        nbytes = leaf.size * leaf.dtype.itemsize
        if nbytes < LARGE_TENSOR_BYTES:
            continue
        intended_shard = intended.shard_shape(leaf.shape)
        actual_shard = leaf.sharding.shard_shape(leaf.shape)
        if intended_shard != tuple(leaf.shape) and actual_shard == tuple(leaf.shape):
            raise PlacementError(
                f"parameter {jax.tree_util.keystr(path)} {leaf.shape} is replicated on every device, "
                f"but the sharding rules give it {intended.spec} (shard {intended_shard})"
            )
    total = sum(leaf.size * leaf.dtype.itemsize for _, leaf in flat)
    local = per_device_bytes(params)
    log(f"parameters: {total / 2**20:.1f} MiB in all, {local / 2**20:.1f} MiB per device on mesh {dict(mesh.shape)}")
    return local


def device_batch(
    host_batch: dict[str, np.ndarray], text: Callable[[np.ndarray], np.ndarray], mesh: Mesh, rules: Any
) -> dict[str, jax.Array]:
    """This process's numpy batch -> global jax.Arrays sharded along the batch axis; the `instruction` strings
    become `text_embeddings` through `text` (e.g. a `wamjax.models.text.TextEmbedder`)."""
    arrays = {k: v for k, v in host_batch.items() if v.dtype.kind not in "US"}
    arrays["text_embeddings"] = text(host_batch["instruction"])
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), np.asarray(v))
        for k, v in arrays.items()
    }
