"""Reading a training checkpoint's weights for scripts, without the training machinery."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from wamjax.checkpoint import adapters
from wamjax.checkpoint import manager as ckpt
from wamjax.models.config import ModelConfig, model_config_from_run
from wamjax.paths import PathLike, as_path


def _is_complete_step(path: epath.Path) -> bool:
    # Locally Orbax renames a step into place once it is complete; on an object store (gs://) it writes the
    # step in place and marks it complete last, so a save cut short by preemption leaves a step that looks
    # whole but is not. Orbax's finalization check knows both layouts.
    return (path / "state").is_dir() and ocp.path.step.is_path_finalized(path)


def resolve_step_dir(path: PathLike) -> epath.Path:
    """A step directory from either a step directory or a run's `checkpoints/` folder (its newest complete step)."""
    path = as_path(path)
    if (path / "state").is_dir():
        if not ocp.path.step.is_path_finalized(path):
            raise FileNotFoundError(f"{path} is an incomplete checkpoint step (a save that did not finish)")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: expected a checkpoint step directory or checkpoints/")
    steps = sorted(int(d.name) for d in path.iterdir() if d.name.isdigit() and _is_complete_step(d))
    if not steps:
        raise FileNotFoundError(f"{path} is neither a checkpoint step directory nor holds complete steps")
    return path / str(steps[-1])


def load_checkpoint(
    path: PathLike, use_ema: bool = True, sharding: jax.sharding.Sharding | None = None,
    base: PathLike | None = None,
) -> tuple[ml_collections.ConfigDict, Any]:
    """(run config, params) of a checkpoint step (EMA params when present and `use_ema`).

    Only the parameters are read (never the optimizer state), as host numpy arrays, or straight onto
    `sharding` when given. Works for checkpoints saved on any mesh; nothing of the training loop is imported.
    An adapters-only step (`lora.save_adapters_only`) is put onto its base: `base` when given (a checkpoint step
    or a diffusers Wan folder), else the one its config names (`lora.base`).
    """
    step_dir = resolve_step_dir(path)
    config = ml_collections.ConfigDict(ckpt.read_json_item(step_dir, "config"))
    params, _ = restore_step_params(step_dir, config, use_ema=use_ema, sharding=sharding, base=base)
    return config, params


def restore_step_params(
    step_dir: PathLike, run_config: Any, *, use_ema: bool, sharding: jax.sharding.Sharding | None = None,
    base: PathLike | None = None,
) -> tuple[Any, bool]:
    """(every parameter, whether the saved ones are the EMA copy) of a step, an adapters-only one onto its base
    (`base`, else its config's `lora.base`); `load_checkpoint` without the config read."""
    params, has_ema = ckpt.restore_params(step_dir, use_ema=use_ema, sharding=sharding)
    named = adapters.saved_base(run_config)
    if named:
        source = str(base or named)
        base_params = adapters.load_base(source, run_config, sharding=sharding)
        params = adapters.onto_base(base_params, params, where=f"adapters {step_dir} onto base {source}")
    elif base is not None:
        raise ValueError(f"a base ({base}) was given, but {step_dir} holds every parameter (not an adapters-only "
                         "step)")
    return params, has_ema


def load_model_run_config(path: PathLike) -> ml_collections.ConfigDict:
    """The run config a checkpoint was trained with (no weights read)."""
    return ml_collections.ConfigDict(ckpt.read_json_item(resolve_step_dir(path), "config"))


def load_model_config(path: PathLike) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with."""
    return model_config_from_run(ckpt.read_json_item(resolve_step_dir(path), "config"))


def load_norm_stats(path: PathLike) -> dict:
    """The normalization statistics saved with a checkpoint as stored ({} for synthetic data); consumers check them
    against the run with `wamjax.checkpoint.norm_stats.checked_norm_stats`."""
    return ckpt.read_json_item(resolve_step_dir(path), "norm_stats")
