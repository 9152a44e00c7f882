"""Reading a training checkpoint's weights for scripts, without the training machinery."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from wamjax.checkpoint import manager as ckpt
from wamjax.models.config import ModelConfig, model_config_from_run


def resolve_step_dir(path: str) -> str:
    """A step directory from either a step directory or a run's `checkpoints/` folder (its newest complete step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return path
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d, "state")))
    if not steps:
        raise FileNotFoundError(f"{path} is neither a checkpoint step directory nor holds complete steps")
    return os.path.join(path, str(steps[-1]))


def load_checkpoint(path: str, use_ema: bool = True) -> tuple[ml_collections.ConfigDict, Any]:
    """(run config, params) of a checkpoint step (EMA params when present and `use_ema`), as host numpy arrays.

    Works for checkpoints saved on any mesh; nothing of the training loop is imported.
    """
    step_dir = resolve_step_dir(path)
    config = ml_collections.ConfigDict(ckpt.read_json_item(step_dir, "config"))
    state = ckpt.restore_state_tree(step_dir)
    params = state["ema_params"] if use_ema and state.get("ema_params") is not None else state["params"]
    import jax
    import numpy as np

    return config, jax.tree.map(np.asarray, params)


def load_model_config(path: str) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with."""
    return model_config_from_run(ckpt.read_json_item(resolve_step_dir(path), "config"))


def load_norm_stats(path: str) -> dict:
    """The normalization statistics saved with a checkpoint ({} for synthetic data)."""
    return ckpt.read_json_item(resolve_step_dir(path), "norm_stats")
