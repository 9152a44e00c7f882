"""Adapters-only checkpoints (`lora.save_adapters_only`): the steps of a LoRA stage hold the adapters and the
modules trained in full; the frozen base stays where it came from, named in the step's saved config (`lora.base`).

Reading such a step puts the saved leaves onto the base's parameters: a wamjax checkpoint step (itself possibly
adapters-only) or a diffusers Wan folder. A base whose shapes do not fit the adapters is refused naming the key and
both shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import traverse_util

from wamjax.checkpoint.wan_import import import_diffusers_wan
from wamjax.models.config import model_config_from_run
from wamjax.paths import PathLike, as_path

ADAPTER_LEAVES = ("lora_a", "lora_b")


def saved_base(run_config: Mapping[str, Any]) -> str:
    """The base an adapters-only step was saved against ("" for a step holding every parameter)."""
    return str(run_config.get("lora", {}).get("base", "") or "")


def subset(tree: Mapping[str, Any], keep: Callable[[str], bool]) -> dict[str, Any]:
    """The nested-dict part of `tree` whose '/'-joined leaf names `keep` accepts."""
    return traverse_util.unflatten_dict({k: v for k, v in flat(tree).items() if keep(k)}, sep="/")


def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} of a nested dict."""
    return traverse_util.flatten_dict(dict(tree), sep="/")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def check_onto(base: Mapping[str, Any], adapters: Mapping[str, Any], where: str) -> None:
    """Refuses adapters that do not fit `base`: a leaf both hold with other shapes, or a low-rank pair whose
    in/out widths are not its kernel's (each naming the key and both shapes)."""
    base_flat, saved = flat(base), flat(adapters)
    for key, value in saved.items():
        if key in base_flat and _shape(base_flat[key]) != _shape(value):
            raise ValueError(f"{where}: {key} has shape {_shape(value)} in the adapters but {_shape(base_flat[key])} "
                             "in the base")
        layer, leaf = key.rsplit("/", 1)
        kernel = base_flat.get(f"{layer}/kernel")
        if leaf not in ADAPTER_LEAVES or kernel is None:
            continue
        ks, s = _shape(kernel), _shape(value)
        # A [..., in, r] beside a kernel [..., in, out]; B [..., r, out].
        fits = s[:-1] == ks[:-1] if leaf == "lora_a" else (s[:-2] == ks[:-2] and s[-1] == ks[-1])
        if not fits:
            raise ValueError(f"{where}: {key} has shape {s}; the base's {layer}/kernel has shape {ks}")


def onto_base(base: Mapping[str, Any], adapters: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`base` with every leaf of `adapters` put in (checked with `check_onto`)."""
    check_onto(base, adapters, where)
    return traverse_util.unflatten_dict({**flat(base), **flat(adapters)}, sep="/")


def load_base(base: PathLike, run_config: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """The parameters of a base: a wamjax checkpoint step (or `checkpoints/`; its `params`, never its EMA copy,
    as the stage that trained the adapters read it), or a diffusers Wan folder."""
    from wamjax.checkpoint.load import load_checkpoint  # load reads adapters-only steps through this module

    path = as_path(base)
    if (path / "config.json").exists() and not (path / "state").exists():
        _, params = import_diffusers_wan(str(base), model_config_from_run(run_config))
        return params if sharding is None else jax.device_put(params, sharding)
    if not path.exists():
        raise FileNotFoundError(f"the adapters' base {base} does not exist (lora.base of the checkpoint; give "
                                "another with base=... / --lora_base)")
    return load_checkpoint(path, use_ema=False, sharding=sharding)[1]
