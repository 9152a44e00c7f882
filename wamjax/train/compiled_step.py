"""A compiled train step kept in a file (`train.compiled_step`), so that a restarted job compiles nothing.

`python -m wamjax.compile_check --save=FILE` writes it for a TPU topology from a CPU; without one, a job's first
start writes it. A start whose devices, argument shapes and shardings, schedule and step-shaping config equal the
file's fingerprint loads the executable; any difference is refused, naming it (delete the file or point
`train.compiled_step` elsewhere to compile afresh). The file holds the fingerprint and JAX's serialized executable.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jaxlib
import ml_collections
from absl import logging
from jax.experimental import serialize_executable

from wamjax.paths import PathLike, as_path, is_uri
from wamjax.stages import stage_list

FORMAT = 1
# What shapes the compiled step besides its arguments: the model, its losses, the optimizer, the mesh rules.
CONFIG_GROUPS = ("model", "diffusion", "optim", "lora", "mesh")
CONFIG_KEYS = ("train.microbatches", "train.param_dtype")


def stage_path(config: ml_collections.ConfigDict, stage: str) -> str:
    """`train.compiled_step` for `stage` ("{stage}" in it replaced); a job of several stages must have one."""
    path = str(config.train.compiled_step)
    if "{stage}" not in path and len(stage_list(config)) > 1:
        raise ValueError(f"train.compiled_step={path!r} in a job of several stages ({', '.join(stage_list(config))})"
                         ": each stage compiles its own step; put {stage} in the file name")
    return path.replace("{stage}", stage)


def _flat(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key in sorted(value):
            out.update(_flat(f"{prefix}.{key}", value[key]))
        return out
    return {prefix: repr(value)}


def _spec(leaf: Any) -> str:
    sharding = getattr(leaf, "sharding", None)
    spec = getattr(sharding, "spec", None)
    return "unsharded" if sharding is None else (str(spec) if spec is not None else type(sharding).__name__)


def fingerprint(config: ml_collections.ConfigDict, stage: str, mesh: jax.sharding.Mesh, args: Any, *,
                total_steps: int, stage_start_step: int) -> dict[str, Any]:
    """What a compiled train step of `stage` depends on: versions, devices, every argument's shape, dtype and
    sharding, the schedule and the config that shapes the step (`CONFIG_GROUPS`, `CONFIG_KEYS`, the stage's)."""
    device = mesh.devices.flat[0]
    values = config.to_dict()
    flat: dict[str, str] = {}
    for group in CONFIG_GROUPS:
        flat.update(_flat(group, values.get(group, {})))
    flat.update(_flat(f"stages.{stage}", values.get("stages", {}).get(stage, {})))
    for key in CONFIG_KEYS:
        section, name = key.split(".")
        flat[key] = repr(values.get(section, {}).get(name))
    flat["schedule.total_steps"] = repr(int(total_steps))
    flat["schedule.stage_start_step"] = repr(int(stage_start_step))
    arguments = [f"{jax.tree_util.keystr(path)}: {tuple(leaf.shape)} {leaf.dtype} {_spec(leaf)}"
                 for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]]
    return {
        "format": FORMAT,
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
        "devices": {"platform": device.platform, "device_kind": device.device_kind, "count": int(mesh.size),
                    "mesh": {str(k): int(v) for k, v in mesh.shape.items()}},
        "arguments": arguments,
        "config": flat,
    }


def difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The first way `current` differs from the file's fingerprint `saved`, in words (None when equal)."""
    if saved.get("format") != current["format"]:
        return f"file format {saved.get('format')}, this wamjax writes {current['format']}"
    for section in ("versions", "devices", "config"):
        old, new = saved.get(section, {}), current[section]
        for key in dict.fromkeys([*old, *new]):  # in the order they were written: platform and kind first
            if old.get(key) != new.get(key):
                return f"{section}.{key}: {old.get(key, '(absent)')} in the file, {new.get(key, '(absent)')} here"
    old, new = saved.get("arguments", []), current["arguments"]
    for i, (a, b) in enumerate(zip(old, new, strict=False)):
        if a != b:
            return f"argument {i}: {a!r} in the file, {b!r} here"
    if len(old) != len(new):
        return f"{len(old)} arguments in the file, {len(new)} here"
    return None


def save(path: PathLike, executable: Any, expected: Mapping[str, Any]) -> None:
    """Writes `executable` (a `jax.stages.Compiled`) and its fingerprint; a local file appears whole or not at all."""
    blob = pickle.dumps({"fingerprint": dict(expected), "executable": serialize_executable.serialize(executable)})
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(path):  # object stores write an object whole
        target.write_bytes(blob)
        return
    partial = target.parent / f".{target.name}.partial"
    partial.write_bytes(blob)
    partial.rename(target)


def load(path: PathLike, expected: Mapping[str, Any]) -> Callable:
    """The executable in `path`, loaded onto this job's devices; a ValueError naming the difference when its
    fingerprint is not `expected`."""
    try:
        stored = pickle.loads(as_path(path).read_bytes())
        saved, (payload, in_tree, out_tree) = stored["fingerprint"], stored["executable"]
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"train.compiled_step={path} is not a compiled step wamjax wrote ({type(e).__name__}: "
                         f"{e})") from e
    diff = difference(saved, expected)
    if diff is not None:
        raise ValueError(f"train.compiled_step={path} was compiled for another job: {diff}; delete it or set "
                         "train.compiled_step to another file to compile afresh")
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)


class FileBackedStep:
    """The loop's jitted step with `train.compiled_step`: on the first call, loads the file when it exists (refused
    when it does not fit the call), else compiles and writes it (the lead process)."""

    def __init__(self, jitted: Callable, path: str, make_fingerprint: Callable[[Any], dict], is_lead: bool):
        self._jitted, self._path, self._make_fingerprint, self._is_lead = jitted, path, make_fingerprint, is_lead
        self._fn: Callable | None = None
        self.loaded = False

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            expected = self._make_fingerprint(args)
            if as_path(self._path).exists():
                self._fn, self.loaded = load(self._path, expected), True
                logging.info("train step loaded from %s (train.compiled_step): nothing compiled", self._path)
            else:
                self._fn = self._jitted.lower(*args).compile()
                if self._is_lead:
                    save(self._path, self._fn, expected)
                    logging.info("train step compiled and written to %s (train.compiled_step)", self._path)
        return self._fn(*args)
