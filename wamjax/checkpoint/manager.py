"""Orbax checkpoints: train state + Grain iterator state + FLOP ledger + config + norm stats per step.

Layout: WORKDIR/checkpoints/<step>/{state/, data/, ledger/, config/, norm_stats/}. Orbax writes a step to a
temporary directory and renames it when every item is complete, so an interrupted save is never listed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "ledger", "config", "norm_stats")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, checkpoint_config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A CheckpointManager saving every `every_steps`, keeping the last `keep` plus every `keep_period`-th."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(checkpoint_config.every_steps)),
        max_to_keep=int(checkpoint_config.keep) if checkpoint_config.keep > 0 else None,
        keep_period=int(checkpoint_config.keep_period) or None,
        enable_async_checkpointing=bool(checkpoint_config.async_save),
        create=True,
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "ledger": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "norm_stats": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS, options=options, item_handlers=handlers)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
    ledger: dict,
    config: dict,
    norm_stats: dict,
    force: bool = False,
) -> bool:
    """Saves one step (asynchronously when configured); returns whether a save started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        ledger=ocp.args.JsonSave(ledger),
        config=ocp.args.JsonSave(config),
        norm_stats=ocp.args.JsonSave(norm_stats),
    )
    return manager.save(step, args=args, force=force)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any | None
) -> tuple[Any, dict, dict, dict]:
    """Restores state onto the shardings in `abstract_state` (any mesh), and the iterator in place.

    Returns (state, ledger, config, norm_stats).
    """
    items: dict[str, Any] = {
        "state": ocp.args.StandardRestore(abstract_state),
        "ledger": ocp.args.JsonRestore(),
        "config": ocp.args.JsonRestore(),
        "norm_stats": ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["ledger"], restored["config"], restored["norm_stats"]


def read_json_item(step_dir: str, item: str) -> Any:
    """Reads a JSON item (ledger, config, norm_stats) of a step directory without a manager."""
    path = os.path.join(step_dir, item, "metadata")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {step_dir} a complete wamjax checkpoint step?")
    with open(path) as f:
        return json.load(f)


def restore_state_tree(step_dir: str, abstract_state: Any = None) -> Any:
    """Restores the `state` item of a step directory as host-local arrays (or onto `abstract_state`'s shardings)."""
    checkpointer = ocp.StandardCheckpointer()
    path = os.path.join(os.path.abspath(step_dir), "state")
    if abstract_state is None:
        metadata = checkpointer.metadata(path)
        tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
        device = jax.local_devices(backend="cpu")[0] if _has_cpu() else jax.local_devices()[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        abstract_state = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
        )
    return checkpointer.restore(path, abstract_state)


def _has_cpu() -> bool:
    try:
        return bool(jax.local_devices(backend="cpu"))
    except RuntimeError:
        return False
