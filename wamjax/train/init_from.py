"""A stage's starting parameters: from `init_from` (a checkpoint or a diffusers Wan folder), the previous stage,
or fresh; checkpoint parameters read parameters-only onto the target shardings."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging

from wamjax.checkpoint import adapters
from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import load_checkpoint
from wamjax.checkpoint.wan_import import import_diffusers_wan
from wamjax.paths import PathLike, as_path
from wamjax.stages import StageSpec
from wamjax.train.step import TrainState


@dataclasses.dataclass
class StageResult:
    """A finished stage: its name, final train state (None when it finished in an earlier attempt), last global
    step and why it ended."""

    name: str
    state: TrainState | None
    final_step: int
    reason: str


def initialize_from(spec: StageSpec, state: TrainState, shardings: TrainState, previous: StageResult | None,
                     workdir: Any) -> TrainState:
    """Fills the backbone (or everything that matches) from init_from or the previous stage; logs the source.

    A checkpoint source is read parameters-only, each leaf straight onto its shards of the target mesh.
    """
    stage, source = spec.name, spec.init_from
    target = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          state.params, shardings.params)
    if source:
        source_path = as_path(source)
        if (source_path / "config.json").exists() and not (source_path / "state").exists():

            _, loaded = import_diffusers_wan(source, dataclasses.replace(spec.model))
            logging.info("stage %s: backbone from diffusers Wan weights %s", stage, source)
            params = merge_params(state.params, loaded, shardings.params)
        else:
            params = restore_matching_params(source_path, state.params, target)
            logging.info("stage %s: parameters from checkpoint %s", stage, source)
    elif previous is not None and previous.state is not None:
        params = merge_params(state.params, previous.state.params, shardings.params)
        logging.info("stage %s: parameters from the previous stage %s", stage, previous.name)
    elif previous is not None:  # the previous stage finished in an earlier attempt of this job
        step_dir = ckpt.step_dir(workdir, previous.final_step)
        params = restore_matching_params(step_dir, state.params, target)
        logging.info("stage %s: parameters from the previous stage %s (checkpoint %s)", stage, previous.name, step_dir)
    else:
        logging.info("stage %s: fresh initialization (no init_from)", stage)
        return state
    ema = state.ema_params
    if ema is not None:
        ema = params
    return state.replace(params=params, ema_params=ema)


def restore_matching_params(step_dir: PathLike, params: Any, target: Any) -> Any:
    """`params` with every leaf the checkpoint also has (same path) restored from it onto `target`'s shardings.

    Only those parameters are read (no optimizer state); each process reads just its own shards. An adapters-only
    step is read whole, onto the base it names (`wamjax.checkpoint.load.load_checkpoint`).
    """
    if adapters.saved_base(ckpt.read_json_item(step_dir, "config")):
        _, loaded = load_checkpoint(step_dir, use_ema=False)
        return merge_params(params, loaded, jax.tree.map(lambda leaf: leaf.sharding, target))
    saved = {jax.tree_util.keystr(p): m for p, m in
             jax.tree_util.tree_flatten_with_path(ckpt.saved_state_tree(step_dir)["params"])[0]}
    wanted = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        key = jax.tree_util.keystr(path)
        if key in saved:
            if tuple(saved[key].shape) != tuple(leaf.shape):
                raise ValueError(f"init_from {step_dir}: {key} has shape {tuple(saved[key].shape)}; "
                                 f"the model needs {tuple(leaf.shape)}")
            wanted[key] = leaf
    subset = _nested_subset(target, wanted)
    restored, _ = ckpt.restore_params(step_dir, subset)
    return merge_params(params, restored, None)


def _nested_subset(tree: Any, wanted: dict[str, Any], prefix: tuple = ()) -> Any:
    """The nested-dict part of `tree` whose leaf paths are keys of `wanted` (empty dicts dropped)."""
    out = {}
    for name, value in tree.items():
        path = (*prefix, jax.tree_util.DictKey(name))
        if isinstance(value, dict):
            sub = _nested_subset(value, wanted, path)
            if sub:
                out[name] = sub
        elif jax.tree_util.keystr(path) in wanted:
            out[name] = value
    return out


def merge_params(target: Any, source: Any, shardings: Any) -> Any:
    """Target tree with every leaf that `source` also has (same path and shape) taken from `source`.

    Host arrays are placed onto `shardings` (each process puts its own shards; valid on a multi-host mesh);
    with `shardings=None` the source leaves are already global arrays on the right shardings.
    """
    flat_source = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    taken, fresh = [], []

    def pick(path, leaf, sharding=None):
        key = jax.tree_util.keystr(path)
        if key in flat_source:
            value = flat_source[key]
            if tuple(value.shape) != tuple(leaf.shape):
                raise ValueError(f"init_from: {key} has shape {tuple(value.shape)}; the model needs {leaf.shape}")
            taken.append(key)
            if isinstance(value, jax.Array):
                value = value.astype(leaf.dtype)
                return value if sharding is None else jax.device_put(value, sharding)
            host = np.asarray(value, leaf.dtype)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        fresh.append(key)
        return leaf

    if shardings is None:
        merged = jax.tree_util.tree_map_with_path(pick, target)
    else:
        merged = jax.tree_util.tree_map_with_path(pick, target, shardings)
    logging.info("init_from: %d tensors restored, %d freshly initialized%s", len(taken), len(fresh),
                 f" ({', '.join(sorted({k.split(']')[0] + ']' for k in fresh}))})" if fresh else "")
    return merged
