"""Orbax checkpoints: train state + Grain iterator state + FLOP ledger + config + norm stats per step.

Layout: WORKDIR/checkpoints/<step>/{state/, data/, ledger/, config/, norm_stats/}. On a local disk Orbax writes a
step to a temporary directory and renames it when every item is complete; on gs:// it writes the step in place
and adds `commit_success.txt` last. Either way an interrupted save is never restored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from wamjax.paths import PathLike, as_path

ITEMS = ("state", "data", "ledger", "config", "norm_stats")


def checkpoint_dir(workdir: PathLike) -> epath.Path:
    """WORKDIR/checkpoints (a URI workdir stays a URI)."""
    return as_path(workdir) / "checkpoints"


def step_dir(workdir: PathLike, step: int) -> epath.Path:
    """WORKDIR/checkpoints/STEP."""
    return checkpoint_dir(workdir) / str(int(step))


@dataclasses.dataclass
class KeepSteps:
    """An Orbax preservation policy keeping the steps in `steps` (added to while the job runs)."""

    steps: set[int] = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        del context
        return [info.step in self.steps for info in checkpoints]


def make_manager(workdir: PathLike, checkpoint_config: ml_collections.ConfigDict,
                 keep_steps: KeepSteps | None = None) -> ocp.CheckpointManager:
    """A CheckpointManager saving every `every_steps`, keeping the last `keep`, every `keep_period`-th and the
    steps of `keep_steps` (the trainer's: each stage's last step, which a later stage may still read)."""
    import grain  # the trainer's data item only: loading weights for inference needs no Grain

    policies = ocp.checkpoint_managers
    keep = [policies.LatestN(n=int(checkpoint_config.keep) if checkpoint_config.keep > 0 else None),
            keep_steps or KeepSteps()]
    if int(checkpoint_config.keep_period):
        keep.append(policies.EveryNSteps(interval_steps=int(checkpoint_config.keep_period)))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(checkpoint_config.every_steps)),
        preservation_policy=policies.AnyPreservationPolicy(keep),
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
    import grain

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
        import grain

        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["ledger"], restored["config"], restored["norm_stats"]


def read_json_item(step_path: PathLike, item: str) -> Any:
    """Reads a JSON item (ledger, config, norm_stats) of a step directory without a manager."""
    path = as_path(step_path) / item / "metadata"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {step_path} a complete wamjax checkpoint step?")
    return json.loads(path.read_text())


def _state_path(step_path: PathLike) -> epath.Path:
    path = as_path(step_path) / "state"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: is {step_path} a complete wamjax checkpoint step?")
    return path


def _is_array_metadata(m: Any) -> bool:
    return hasattr(m, "shape") and hasattr(m, "dtype")


def saved_state_tree(step_path: PathLike) -> Any:
    """The `state` item's tree of array metadata (shapes, dtypes), read without reading any array."""
    metadata = ocp.StandardCheckpointer().metadata(_state_path(step_path))
    return metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata


def restore_params(
    step_path: PathLike, target: Any = None, *, use_ema: bool = False, sharding: jax.sharding.Sharding | None = None
) -> tuple[Any, bool]:
    """(parameters, whether they are the EMA copy) of a checkpoint step; only those arrays are read.

    The optimizer state and the other copy of the weights stay on disk. `use_ema` takes `ema_params` when the
    step has them. `target`, a tree of `jax.ShapeDtypeStruct`s with shardings whose paths are a subset of the
    saved parameters, restores exactly those leaves straight onto their shardings (each process reads only
    its shards). Without `target` every saved leaf is restored, onto `sharding` when given, else as host
    numpy arrays.
    """
    path = _state_path(step_path)
    tree = saved_state_tree(step_path)
    has_ema = use_ema and bool(jax.tree.leaves(tree.get("ema_params"), is_leaf=_is_array_metadata))
    name = "ema_params" if has_ema else "params"
    if name not in tree:
        raise KeyError(f"{path} holds no {name!r} (items: {sorted(tree)})")
    if target is None:
        target = tree[name]
        if sharding is None:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target,
                                        is_leaf=_is_array_metadata)
        else:
            restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=m.shape),
                                        target, is_leaf=_is_array_metadata)
    else:
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target
        )
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item={name: target}, restore_args={name: restore_args}, partial_restore=True)
    )
    return restored[name], has_ema
