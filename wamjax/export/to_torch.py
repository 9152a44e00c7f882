"""Export of a training checkpoint to PyTorch formats: a diffusers Wan transformer and the whole WAM.

  python -m wamjax.export.to_torch --checkpoint=WORKDIR/checkpoints/STEP --out=OUT \
      [--dtype=float32|bfloat16] [--use_ema=true] [--max_shard_size=10GB] [--lora=merge|adapters]

writes
  OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}   the video backbone, loadable by
      diffusers.WanTransformer3DModel.from_pretrained (sharded with an index json above --max_shard_size);
  OUT/wam.safetensors + OUT/wam_config.json   the whole model (backbone + action/proprio modules), loadable by
      wamjax.export.torch_wam.WorldActionModel.from_pretrained(OUT) and by `import_wam(OUT)`;
  OUT/norm_stats.json   the checkpoint's action/proprio normalization statistics;
  OUT/lora/pytorch_lora_weights.safetensors   with --lora=adapters, a LoRA checkpoint's adapters (PEFT layout).

Tensors are written with safetensors' numpy API (bfloat16 through ml_dtypes), so exporting needs no torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import resolve_step_dir, restore_step_params
from wamjax.checkpoint.norm_stats import checked_norm_stats
from wamjax.checkpoint.wan_import import WeightImportError, state_dict_to_params, to_numpy
from wamjax.checkpoint.wan_names import name_map, ours_to_torch, torch_to_ours
from wamjax.export import lora as lora_lib
from wamjax.logs import quiet_libraries
from wamjax.models.config import ModelConfig
from wamjax.paths import PathLike, as_path, is_uri
from wamjax.stages import policy_spec

WAM_WEIGHTS_NAME = "wam.safetensors"
WAM_CONFIG_NAME = "wam_config.json"
NORM_STATS_NAME = "norm_stats.json"
TRANSFORMER_DIR = "transformer"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
WAM_FORMAT = "wamjax-wam"
WAM_FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 10 * 1000**3  # diffusers' own default, max_shard_size="10GB"
ACTIONS_PREFIX = "actions."
VIEW_EMBEDDING = "view_embedding"  # [views, dim]: the tokens view layout's per-camera embedding (wamjax only)
_EXTRA_PARAMS = ("actions", VIEW_EMBEDDING)  # wamjax parameters outside the diffusers Wan backbone
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# safetensors files without this metadata are refused by transformers' loaders.
_SAFETENSORS_METADATA = {"format": "pt"}


def _export_dtype(dtype: str | np.dtype) -> np.dtype:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"export dtype {name!r} is not supported; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _get(tree: Mapping[str, Any], path: tuple[str, ...], what: str) -> Any:
    node: Any = tree
    for i, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node:
            raise WeightImportError(f"{what}: parameter {'/'.join(path[: i + 1])!r} is missing from the param tree")
        node = node[part]
    return node


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out += _leaf_paths(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


# --- Action / proprio modules: torch names and shapes ------------------------------------------------------

def action_name_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
    """Every (torch key, our path, kind, torch shape) of the action/proprio modules under params["actions"]."""
    d = cfg.dim
    linears = {
        ("action_encoder", "linear_1"): (cfg.action_dim, d),
        ("action_encoder", "linear_2"): (d, d),
        ("proprio_encoder", "linear_1"): (cfg.proprio_dim, d),
        ("proprio_encoder", "linear_2"): (d, d),
        ("time_embedder", "linear_1"): (cfg.freq_dim, d),
        ("time_embedder", "linear_2"): (d, d),
        ("time_proj",): (d, 6 * d),
        ("action_decoder",): (d, cfg.action_dim),
    }
    entries = []
    for path, (fan_in, fan_out) in linears.items():
        name = ACTIONS_PREFIX + ".".join(path)
        entries.append((f"{name}.weight", ("actions", *path, "kernel"), "linear", (fan_out, fan_in)))
        entries.append((f"{name}.bias", ("actions", *path, "bias"), "same", (fan_out,)))
    entries.append((f"{ACTIONS_PREFIX}position_embedding", ("actions", "position_embedding"), "same",
                    (cfg.max_action_tokens, d)))
    entries.append((f"{ACTIONS_PREFIX}type_embedding", ("actions", "type_embedding"), "same", (2, d)))
    return entries


# --- JAX params -> torch state dicts -----------------------------------------------------------------------

def _check_backbone_leaves(cfg: ModelConfig, params: Mapping[str, Any]) -> None:
    """Raises naming the first backbone parameter that `params` lacks or that `cfg`'s name map does not know."""
    entries = name_map(cfg)
    for key, path, _, _ in entries:
        _get(params, path, f"diffusers key {key!r}")
    known = {path for _, path, _, _ in entries}
    backbone = {k: v for k, v in params.items() if k not in _EXTRA_PARAMS}
    extra = sorted("/".join(p) for p in _leaf_paths(backbone) if p not in known)
    if extra:
        raise WeightImportError(f"parameter {extra[0]!r} is not part of the Wan backbone of this config "
                                f"({len(extra)} unexpected in all)")


def iter_diffusers_state(cfg: ModelConfig, params: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(diffusers key, numpy tensor in torch layout) for every backbone parameter, one at a time, so a large
    model is converted without a second full copy in memory. The strict key check runs before it returns."""
    _check_backbone_leaves(cfg, params)
    return _iter_diffusers_state(cfg, params)


def _iter_diffusers_state(cfg: ModelConfig, params: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    for key, path, kind, layer in name_map(cfg):
        value = np.asarray(_get(params, path, f"diffusers key {key!r}"))
        if layer is not None:
            if value.shape[0] != cfg.num_layers:
                raise WeightImportError(
                    f"parameter {'/'.join(path)!r} stacks {value.shape[0]} layers; model.num_layers={cfg.num_layers}"
                )
            value = value[layer]
        yield key, np.ascontiguousarray(ours_to_torch(value, kind))


def params_to_diffusers_state(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The diffusers WanTransformer3DModel state dict (numpy, torch layouts) of the backbone of `params`.

    Strict: every backbone parameter of `cfg` must be present, and the backbone must hold nothing else
    (the `actions` subtree and the `view_embedding` are ignored here).
    """
    return dict(iter_diffusers_state(cfg, params))


def params_to_wam_state(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The whole model's state dict (numpy, torch layouts): diffusers backbone keys plus `actions.*` and, for
    the tokens view layout, `view_embedding` [views, dim]."""
    state = params_to_diffusers_state(cfg, params)
    if VIEW_EMBEDDING in params:
        value = np.asarray(params[VIEW_EMBEDDING])
        if value.ndim != 2 or value.shape[1] != cfg.dim:
            raise WeightImportError(f"parameter {VIEW_EMBEDDING!r} has shape {value.shape}; expected "
                                    f"(views, {cfg.dim})")
        state[VIEW_EMBEDDING] = np.ascontiguousarray(value)
    if "actions" not in params:
        return state
    entries = action_name_map(cfg)
    known = {path for _, path, _, _ in entries}
    extra = sorted("/".join(p) for p in _leaf_paths({"actions": params["actions"]}) if p not in known)
    if extra:
        raise WeightImportError(f"parameter {extra[0]!r} is not a known action-module parameter")
    for key, path, kind, shape in entries:
        value = ours_to_torch(np.asarray(_get(params, path, f"key {key!r}")), kind)
        if tuple(value.shape) != shape:
            raise WeightImportError(f"parameter {'/'.join(path)!r} has torch shape {tuple(value.shape)}; "
                                    f"expected {shape} for this config")
        state[key] = np.ascontiguousarray(value)
    return state


def wam_state_to_params(state: Mapping[str, Any], cfg: ModelConfig, dtype: Any = np.float32) -> dict[str, Any]:
    """Inverse of `params_to_wam_state`, strictly: a missing, unexpected or misshapen key raises naming it."""
    state = {k: to_numpy(v) for k, v in state.items()}
    action_state = {k: v for k, v in state.items() if k.startswith(ACTIONS_PREFIX)}
    backbone_state = {k: v for k, v in state.items() if not k.startswith(ACTIONS_PREFIX) and k != VIEW_EMBEDDING}
    params = state_dict_to_params(backbone_state, cfg, dtype)
    if VIEW_EMBEDDING in state:
        value = state[VIEW_EMBEDDING]
        if value.ndim != 2 or value.shape[1] != cfg.dim:
            raise WeightImportError(f"key {VIEW_EMBEDDING!r} has shape {tuple(value.shape)}; expected (views, "
                                    f"{cfg.dim})")
        params[VIEW_EMBEDDING] = np.asarray(value).astype(dtype)
    if not action_state:
        return params
    entries = action_name_map(cfg)
    expected = {key for key, _, _, _ in entries}
    for key in sorted(action_state):
        if key not in expected:
            raise WeightImportError(f"unexpected key {key!r} (not an action-module parameter of this config)")
    actions: dict[str, Any] = {}
    for key, path, kind, shape in entries:
        if key not in action_state:
            raise WeightImportError(f"missing key {key!r} in the WAM state dict")
        value = action_state[key]
        if tuple(value.shape) != shape:
            raise WeightImportError(f"key {key!r} has shape {tuple(value.shape)}; expected {shape} for this config")
        node = actions
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.asarray(torch_to_ours(value, kind)).astype(dtype)
    params["actions"] = actions
    return params


# --- Writers -----------------------------------------------------------------------------------------------

def parse_size(size: str | int) -> int:
    """Bytes of a size such as 10GB, 500MB, 5GiB or a plain integer."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}; expected a number of bytes or e.g. 500MB, 10GB, 5GiB")
    number, unit = float(match.group(1)), match.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(number * base**power)


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: PathLike) -> None:
    from safetensors.numpy import save, save_file

    if is_uri(path):
        as_path(path).write_bytes(save(dict(tensors), metadata=_SAFETENSORS_METADATA))
    else:
        save_file(dict(tensors), path, metadata=_SAFETENSORS_METADATA)


def write_diffusers_transformer(
    out_dir: PathLike,
    cfg: ModelConfig,
    params: Mapping[str, Any],
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes the backbone as a diffusers WanTransformer3DModel folder; returns the weight files written.

    `dtype` is "float32" or "bfloat16".

    Above `max_shard_bytes` the weights are split into `diffusion_pytorch_model-0000i-of-0000n.safetensors`
    shards listed in diffusers' `diffusion_pytorch_model.safetensors.index.json`.
    """
    np_dtype = _export_dtype(dtype)
    tensors = ((k, v.astype(np_dtype, copy=False)) for k, v in iter_diffusers_state(cfg, params))
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(cfg.diffusers_config())
    config["_diffusers_version"] = _diffusers_version()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for stale in out_dir.iterdir():  # a previous export with another sharding must not be half-read
        if stale.name.startswith("diffusion_pytorch_model"):
            stale.unlink()

    # Shards are filled in name-map order and written as soon as they are full; a shard is renamed to its
    # final `-0000i-of-0000n` name once the count is known.
    shard: dict[str, np.ndarray] = {}
    shard_bytes, total_bytes, written = 0, 0, []
    weight_map: dict[str, int] = {}

    def flush(tensors: dict[str, np.ndarray]) -> None:
        path = out_dir / f"diffusion_pytorch_model.partial-{len(written)}"
        _save_safetensors(tensors, path)
        weight_map.update({key: len(written) for key in tensors})
        written.append(path)

    for key, value in tensors:
        if shard and shard_bytes + value.nbytes > max_shard_bytes:
            flush(shard)
            shard, shard_bytes = {}, 0
        shard[key] = value
        shard_bytes += value.nbytes
        total_bytes += value.nbytes
    if shard or not written:
        flush(shard)
    if len(written) == 1:
        final = out_dir / DIFFUSERS_WEIGHTS_NAME
        written[0].replace(final)
        return [str(final)]
    names = [DIFFUSERS_WEIGHTS_NAME.replace(".safetensors", f"-{i + 1:05d}-of-{len(written):05d}.safetensors")
             for i in range(len(written))]
    for path, name in zip(written, names, strict=True):
        path.replace(out_dir / name)
    index = {"metadata": {"total_size": int(total_bytes)},
             "weight_map": {key: names[i] for key, i in weight_map.items()}}
    (out_dir / DIFFUSERS_INDEX_NAME).write_text(json.dumps(index, indent=2))
    return [str(out_dir / name) for name in names]


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is not needed to export; the field is informational
        return "0.0.0"


def write_wam(
    out_dir: PathLike,
    cfg: ModelConfig,
    params: Mapping[str, Any],
    dtype: str = "float32",
    extra_config: Mapping[str, Any] | None = None,
) -> str:
    """Writes `wam.safetensors` (every parameter, torch names and layouts) and `wam_config.json`; returns the
    weights path. `extra_config` adds keys (e.g. the run's data settings) to the config json."""
    np_dtype = _export_dtype(dtype)
    state = {k: v.astype(np_dtype) for k, v in params_to_wam_state(cfg, params).items()}
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WAM_WEIGHTS_NAME
    _save_safetensors(state, path)
    config = {
        "format": WAM_FORMAT,
        "format_version": WAM_FORMAT_VERSION,
        "dtype": np_dtype.name,
        "has_actions": "actions" in params,
        "model": cfg.to_dict(),
        **dict(extra_config or {}),
    }
    (out_dir / WAM_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return str(path)


def read_wam_config(out_dir: PathLike) -> dict[str, Any]:
    """The `wam_config.json` of an export, checking its format."""
    path = as_path(out_dir) / WAM_CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a wamjax export (python -m wamjax.export.to_torch)?")
    config = json.loads(path.read_text())
    if config.get("format") != WAM_FORMAT or config.get("format_version") != WAM_FORMAT_VERSION:
        raise ValueError(f"{path}: format {config.get('format')!r} v{config.get('format_version')!r}; "
                         f"expected {WAM_FORMAT!r} v{WAM_FORMAT_VERSION}")
    return config


def import_wam(out_dir: PathLike, dtype: Any = np.float32) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from an export's `wam.safetensors` + `wam_config.json`, with a strict key/shape check."""
    from safetensors.numpy import load, load_file

    cfg = ModelConfig.from_dict(read_wam_config(out_dir)["model"])
    path = as_path(out_dir) / WAM_WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found next to {WAM_CONFIG_NAME}")
    state = load(path.read_bytes()) if is_uri(path) else load_file(path)
    return cfg, wam_state_to_params(state, cfg, dtype)


# --- Checkpoint -> OUT -------------------------------------------------------------------------------------

def export_checkpoint(
    checkpoint: PathLike,
    out_dir: PathLike,
    dtype: str = "float32",
    use_ema: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    lora: str = "merge",
    lora_base: PathLike | None = None,
) -> dict[str, Any]:
    """Exports a checkpoint step (or a run's `checkpoints/` folder: its newest step) to `out_dir`.

    A checkpoint with LoRA adapters: `lora="merge"` writes merged full weights; `lora="adapters"` writes the
    frozen base to `out_dir/transformer/` and the adapters to `out_dir/lora/` (`wamjax.export.lora`). The whole-WAM
    file holds the merged weights either way. Returns a summary: the step directory, whether EMA weights were
    exported, the files written. Only the exported weights are read from the checkpoint (no optimizer state). An
    adapters-only checkpoint is read onto `lora_base` when given, else onto the base it names.
    """
    if lora not in lora_lib.MODES:
        raise ValueError(f"--lora={lora!r}; expected one of {list(lora_lib.MODES)}")
    import ml_collections

    step_dir = resolve_step_dir(checkpoint)
    run_config = ml_collections.ConfigDict(ckpt.read_json_item(step_dir, "config"))
    # Refused before anything is written: an export of real data without its stats would act unnormalized.
    norm_stats = checked_norm_stats(run_config, ckpt.read_json_item(step_dir, "norm_stats"),
                                    where=f"checkpoint {step_dir}")
    params, has_ema = restore_step_params(step_dir, run_config, use_ema=use_ema, base=lora_base)
    cfg = policy_spec(run_config).model
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone, params, adapter_files = lora_lib.export_weights(out_dir, cfg, params, lora)
    shards = write_diffusers_transformer(out_dir / TRANSFORMER_DIR, cfg, backbone, dtype, max_shard_bytes)
    cfg = dataclasses.replace(cfg, lora_rank=0)  # the whole WAM as merged, adapter-free weights
    run = run_config.to_dict()
    extra = {
        "step": int(step_dir.name) if step_dir.name.isdigit() else None,
        "ema": has_ema,
        "run_config": run,
        **camera_config(run_config),
    }
    wam_path = write_wam(out_dir, cfg, params, dtype, extra)
    stats_path = out_dir / NORM_STATS_NAME
    stats_path.write_text(json.dumps(norm_stats, indent=1))
    return {"step_dir": str(step_dir), "ema": has_ema, "files": [*shards, *adapter_files, wam_path, str(stats_path)]}


def camera_config(run_config: Any) -> dict[str, Any]:
    """How the policy's frames are made from its cameras: their names (in order), the layout and the frame size."""
    clip = policy_spec(run_config).clip
    return {"cameras": list(clip.cameras), "view_layout": clip.view_layout, "resolution": list(clip.resolution)}


def main(argv: list[str]) -> None:
    from absl import app, flags

    quiet_libraries()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.checkpoint or not f.out:
        raise app.UsageError("--checkpoint and --out are required")
    try:
        summary = export_checkpoint(f.checkpoint, f.out, f.dtype, f.use_ema, parse_size(f.max_shard_size), f.lora,
                                    f.lora_base or None)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


def define_flags() -> None:
    """Defines the CLI's flags (only when run as a program)."""
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Checkpoint step directory (WORKDIR/checkpoints/STEP) or checkpoints/.")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_enum("dtype", "float32", sorted(_DTYPES), "Dtype of the exported weights.")
    flags.DEFINE_bool("use_ema", True, "Export the EMA weights when the checkpoint has them.")
    flags.DEFINE_string("max_shard_size", "10GB", "Shard the diffusers weights above this size (e.g. 500MB).")
    flags.DEFINE_enum("lora", "merge", ["merge", "adapters"], "A checkpoint with LoRA adapters: merged full weights, "
                      "or the base in transformer/ and the adapters in lora/pytorch_lora_weights.safetensors.")
    flags.DEFINE_string("lora_base", "", "An adapters-only checkpoint (lora.save_adapters_only): the base to read it "
                        "onto, a checkpoint step or a diffusers Wan folder (default: the one it names).")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
