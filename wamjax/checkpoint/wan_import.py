"""Import of Wan 2.1 transformer weights (diffusers `WanTransformer3DModel` layout) into our parameter tree."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from wamjax.checkpoint.wan_names import name_map, torch_to_ours
from wamjax.models.config import ModelConfig

_DIFFUSERS_FIELDS = {
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "rope_max_seq_len", "image_dim",
    "added_kv_proj_dim", "pos_embed_seq_len",
}


# Some converted Wan2.1-I2V checkpoints carry an image-query norm the model never uses; diffusers drops it on
# load (`_keys_to_ignore_on_load_unexpected`), and so do we. Nothing else is skipped.
_IGNORED_I2V_KEY = re.compile(r"blocks\.\d+\.attn2\.norm_added_q\.weight")


class WeightImportError(ValueError):
    """A checkpoint's keys or shapes do not match the target parameter tree."""


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor, jax array or numpy array as a numpy array (torch bfloat16 widened to float32)."""
    if hasattr(value, "detach"):  # torch.Tensor without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy (bfloat16 files are read through torch)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except TypeError:  # numpy has no bfloat16
        with safe_open(path, framework="pt") as f:
            return {key: to_numpy(f.get_tensor(key)) for key in f.keys()}


def read_safetensors_folder(path: str, weights_name: str = "diffusion_pytorch_model") -> dict[str, np.ndarray]:
    """Reads one safetensors file, or every shard listed in `<weights_name>.safetensors.index.json`."""
    if os.path.isfile(path):
        files = [path]
    else:
        index = os.path.join(path, f"{weights_name}.safetensors.index.json")
        single = os.path.join(path, f"{weights_name}.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
        elif os.path.exists(single):
            files = [single]
        else:
            raise FileNotFoundError(f"no {weights_name}.safetensors or its index under {path}")
    state: dict[str, np.ndarray] = {}
    for file in files:
        state |= read_safetensors_file(file)
    return state


def model_config_from_diffusers(config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig from a diffusers WanTransformer3DModel config.json (T2V, or I2V with image_dim and
    added_kv_proj_dim); a setting we do not implement is refused, naming its key."""
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise WeightImportError(f"config key qk_norm={config['qk_norm']!r}: only 'rms_norm_across_heads' (Wan 2.1)")
    values = {k: v for k, v in config.items() if k in _DIFFUSERS_FIELDS}
    values.update(overrides)
    try:
        return ModelConfig.from_dict(values)
    except ValueError as e:
        raise WeightImportError(f"diffusers config: {e}") from None


def import_diffusers_wan(
    path_or_state_dict: str | Mapping[str, Any],
    model_config: ModelConfig | None = None,
    dtype: Any = np.float32,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a diffusers WanTransformer3DModel folder, safetensors file or state dict into (config, params).

    Strict: every source key is used, every target leaf is filled, and shapes match; otherwise a
    WeightImportError names the first offending key. A folder's config.json gives the config unless one is passed.
    """
    if isinstance(path_or_state_dict, str):
        config_path = os.path.join(path_or_state_dict, "config.json")
        if model_config is None:
            if not os.path.exists(config_path):
                raise FileNotFoundError(f"{config_path} not found; pass model_config=")
            with open(config_path) as f:
                model_config = model_config_from_diffusers(json.load(f))
        state = read_safetensors_folder(path_or_state_dict)
    else:
        if model_config is None:
            raise ValueError("importing a state dict needs model_config=")
        state = {k: to_numpy(v) for k, v in path_or_state_dict.items()}
    return model_config, state_dict_to_params(state, model_config, dtype)


def expected_torch_shape(cfg: ModelConfig, key: str) -> tuple[int, ...] | None:
    """Shape diffusers gives `key` for this config (None for keys outside the backbone)."""
    d, pt, ph, pw = cfg.dim, *cfg.patch_size
    out = cfg.out_channels * pt * ph * pw
    table = {
        "patch_embedding.weight": (d, cfg.in_channels, pt, ph, pw), "patch_embedding.bias": (d,),
        "scale_shift_table": (1, 2, d), "proj_out.weight": (out, d), "proj_out.bias": (out,),
        "condition_embedder.time_embedder.linear_1.weight": (d, cfg.freq_dim),
        "condition_embedder.time_embedder.linear_1.bias": (d,),
        "condition_embedder.time_embedder.linear_2.weight": (d, d),
        "condition_embedder.time_embedder.linear_2.bias": (d,),
        "condition_embedder.time_proj.weight": (6 * d, d), "condition_embedder.time_proj.bias": (6 * d,),
        "condition_embedder.text_embedder.linear_1.weight": (d, cfg.text_dim),
        "condition_embedder.text_embedder.linear_1.bias": (d,),
        "condition_embedder.text_embedder.linear_2.weight": (d, d),
        "condition_embedder.text_embedder.linear_2.bias": (d,),
    }
    if cfg.image_conditioned:
        image_dim, embedder = cfg.image_dim, "condition_embedder.image_embedder."
        table |= {
            embedder + "norm1.weight": (image_dim,), embedder + "norm1.bias": (image_dim,),
            embedder + "ff.net.0.proj.weight": (image_dim, image_dim), embedder + "ff.net.0.proj.bias": (image_dim,),
            embedder + "ff.net.2.weight": (d, image_dim), embedder + "ff.net.2.bias": (d,),
            embedder + "norm2.weight": (d,), embedder + "norm2.bias": (d,),
        }
        if cfg.pos_embed_seq_len is not None:
            table[embedder + "pos_embed"] = (1, cfg.pos_embed_seq_len, image_dim)
    if key in table:
        return table[key]
    if not key.startswith("blocks."):
        return None
    suffix = key.split(".", 2)[2]
    if suffix in ("attn2.add_k_proj.weight", "attn2.add_v_proj.weight"):
        return (d, cfg.added_kv_proj_dim)
    if suffix == "scale_shift_table":
        return (1, 6, d)
    if suffix.startswith("ffn.net.0.proj"):
        return (cfg.ffn_dim, d) if suffix.endswith("weight") else (cfg.ffn_dim,)
    if suffix.startswith("ffn.net.2"):
        return (d, cfg.ffn_dim) if suffix.endswith("weight") else (d,)
    if suffix.endswith(".weight") and any(p in suffix for p in ("to_q", "to_k", "to_v", "to_out")):
        return (d, d)
    return (d,)


def state_dict_to_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: Any = np.float32) -> dict:
    """Maps a diffusers state dict (numpy values) onto our backbone tree, strictly."""
    entries = name_map(cfg)
    expected_keys = {e[0] for e in entries}
    for key in sorted(state):
        if key not in expected_keys and not (cfg.image_conditioned and _IGNORED_I2V_KEY.fullmatch(key)):
            hint = ""
            if not cfg.image_conditioned and ("add_k_proj" in key or "image_embedder" in key):
                hint = "; it belongs to an image-conditioned (I2V) Wan: set model.image_dim and added_kv_proj_dim"
            raise WeightImportError(f"unexpected key {key!r} in the source checkpoint (not part of the Wan backbone "
                                    f"of this config){hint}")
    stacked: dict[tuple[str, ...], list] = {}
    params: dict = {}
    for key, path, kind, layer in entries:
        if key not in state:
            raise WeightImportError(f"missing key {key!r} in the source checkpoint")
        value = np.asarray(state[key])
        want = expected_torch_shape(cfg, key)
        if want is not None and tuple(value.shape) != want:
            raise WeightImportError(f"key {key!r} has shape {tuple(value.shape)}; expected {want} for this config")
        value = torch_to_ours(value, kind).astype(dtype)
        if layer is None:
            _set(params, path, value)
        else:
            stacked.setdefault(path, [None] * cfg.num_layers)[layer] = value
    for path, layers in stacked.items():
        _set(params, path, np.stack(layers))
    return params


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
