"""Import a diffusers `AutoencoderKLWan` (Wan 2.1 or 2.2 VAE) checkpoint into wamjax's VAE params pytree."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from wamjax.checkpoint.wan_import import read_safetensors_file, read_safetensors_folder, to_numpy
from wamjax.models.patch_vae import PatchVAEConfig
from wamjax.models.vae import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    Params,
    VAEConfig,
    flatten_params,
    init_vae_params,
    unflatten_params,
    vae_config_for,
    vae_param_shapes,
)


def _read_folder(folder: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    config = None
    config_path = os.path.join(folder, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
    return read_safetensors_folder(folder), config


def _latent_stats(z_dim: int) -> dict[str, tuple[float, ...]]:
    """The published latent statistics for a z_dim (Wan 2.1: 16, Wan 2.2: 48), else zero mean and unit std."""
    for mean, std in ((WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)):
        if len(mean) == z_dim:
            return {"latents_mean": mean, "latents_std": std}
    return {"latents_mean": (0.0,) * z_dim, "latents_std": (1.0,) * z_dim}


def _infer_residual_vae_config(state: Mapping[str, Any], shape: Any) -> VAEConfig:
    """A residual (Wan 2.2) VAE config off state dict shapes; the video is taken to be RGB, so the input
    channels give the patch size."""
    base_dim, in_channels = shape("encoder.conv_in.weight")[:2]
    z_dim = shape("post_quant_conv.weight")[0]
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
    num_res_blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets."))
    dim_mult = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] // base_dim for i in range(blocks))
    temperal_downsample = tuple(f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in state
                                for i in range(blocks - 1))
    patch = math.isqrt(in_channels // 3)
    if 3 * patch * patch != in_channels:
        raise ValueError(f"cannot infer the VAE's patch size from {in_channels} input channels (RGB video "
                         "assumed); pass the config")
    decoder_base_dim = shape("decoder.conv_in.weight")[0] // dim_mult[-1]
    return VAEConfig(
        base_dim=base_dim, decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim, z_dim=z_dim,
        dim_mult=dim_mult, num_res_blocks=num_res_blocks, temperal_downsample=temperal_downsample,
        in_channels=in_channels, out_channels=shape("decoder.conv_out.weight")[0], is_residual=True,
        patch_size=None if patch == 1 else patch, **_latent_stats(z_dim),
    )


def infer_vae_config(state: Mapping[str, Any]) -> VAEConfig:
    """Reads a Wan 2.1 or 2.2 VAE config off state dict shapes (latent stats: the published ones when z_dim is
    16 or 48)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise KeyError(f"cannot infer the VAE config: state dict lacks {key!r}")
        return tuple(state[key].shape)

    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:
        return _infer_residual_vae_config(state, shape)
    base_dim = shape("encoder.conv_in.weight")[0]
    z_dim = shape("post_quant_conv.weight")[0]
    if any(".attentions." in k for k in state if k.startswith("encoder.down_blocks.")):
        raise ValueError(
            "encoder down blocks with attention (attn_scales) cannot be inferred; pass the config"
        )
    num_up = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    # Decoder up blocks hold num_res_blocks + 1 residual blocks.
    num_res_blocks = max(int(k.split(".")[4]) for k in state if k.startswith("decoder.up_blocks.0.resnets."))
    # Encoder residual blocks: num_res_blocks per stage, the first of each stage gives base_dim * dim_mult[i].
    res_outs = []
    i = 0
    while (
        f"encoder.down_blocks.{i}.norm1.gamma" in state
        or f"encoder.down_blocks.{i}.resample.1.weight" in state
    ):
        if f"encoder.down_blocks.{i}.conv1.weight" in state:
            res_outs.append(shape(f"encoder.down_blocks.{i}.conv1.weight")[0])
        i += 1
    dim_mult = tuple(out // base_dim for out in res_outs[::num_res_blocks])
    if len(dim_mult) != num_up:
        raise ValueError(f"encoder has {len(dim_mult)} stages but decoder has {num_up} up blocks")
    temperal_upsample = [
        f"decoder.up_blocks.{j}.upsamplers.0.time_conv.weight" in state for j in range(num_up - 1)
    ]
    decoder_base_dim = shape("decoder.conv_in.weight")[0] // dim_mult[-1]
    return VAEConfig(
        base_dim=base_dim,
        decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim,
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=num_res_blocks,
        temperal_downsample=tuple(temperal_upsample[::-1]),
        **_latent_stats(z_dim),
    )


def _convert(torch_key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """diffusers name and layout -> wamjax name and layout."""
    prefix, leaf = torch_key.rsplit(".", 1)
    if leaf == "gamma":
        return torch_key, value.reshape(-1)
    if leaf == "weight":
        if value.ndim == 5:  # Conv3d [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
            return f"{prefix}.kernel", value.transpose(2, 3, 4, 1, 0)
        if value.ndim == 4:  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
            return f"{prefix}.kernel", value.transpose(2, 3, 1, 0)
    return torch_key, value


def _unconvert(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """wamjax name and layout -> diffusers name and layout (inverse of `_convert`)."""
    prefix, leaf = name.rsplit(".", 1)
    if leaf == "gamma":
        dims = (1, 1) if ".attentions." in name else (1, 1, 1)
        return name, value.reshape(-1, *dims)
    if leaf == "kernel":
        if value.ndim == 5:
            return f"{prefix}.weight", value.transpose(4, 3, 0, 1, 2)
        return f"{prefix}.weight", value.transpose(3, 2, 0, 1)
    return name, value


def convert_diffusers_vae_state(
    state: Mapping[str, Any], vae_config: VAEConfig, dtype: Any = np.float32
) -> Params:
    """A diffusers AutoencoderKLWan state dict -> params pytree, with a strict key and shape check."""
    expected = vae_param_shapes(vae_config)
    flat: dict[str, np.ndarray] = {}
    for torch_key in state:
        name, value = _convert(torch_key, to_numpy(state[torch_key]))
        if name not in expected:
            raise KeyError(f"unexpected key {torch_key!r} in the Wan VAE state dict (maps to {name!r})")
        if tuple(value.shape) != expected[name]:
            raise ValueError(
                f"shape mismatch for {torch_key!r}: got {tuple(value.shape)} after conversion, "
                f"expected {expected[name]} for config {vae_config}"
            )
        flat[name] = value.astype(dtype)
    missing = [name for name in expected if name not in flat]
    if missing:
        raise KeyError(
            f"missing key {missing[0]!r} in the Wan VAE state dict ({len(missing)} missing in all)"
        )
    return unflatten_params(flat)


def export_diffusers_vae_state(params: Params) -> dict[str, np.ndarray]:
    """params pytree -> diffusers AutoencoderKLWan state dict (numpy arrays)."""
    return dict(_unconvert(name, np.asarray(value)) for name, value in flatten_params(params).items())


def write_diffusers_vae(out_dir: str | os.PathLike, vae_config: VAEConfig, params: Params) -> str:
    """Writes the VAE as a diffusers `AutoencoderKLWan` folder (config.json and float32 safetensors weights);
    returns the folder."""
    from safetensors.numpy import save_file  # export-only dependency

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    config = {"_class_name": "AutoencoderKLWan", **vae_config.to_dict()}
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in export_diffusers_vae_state(params).items()}
    save_file(state, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def import_diffusers_wan_vae(
    src: str | os.PathLike | Mapping[str, Any], vae_config: VAEConfig | None = None
) -> tuple[VAEConfig, Params]:
    """(vae_config, params) from a diffusers AutoencoderKLWan folder, a safetensors file or a state dict.

    The config comes from `vae_config`, else the folder's config.json, else the weights' shapes.
    """
    config_dict = None
    if isinstance(src, Mapping):
        state = dict(src)
    else:
        path = os.fspath(src)
        if os.path.isdir(path):
            state, config_dict = _read_folder(path)
        elif os.path.isfile(path) and path.endswith(".safetensors"):
            state = read_safetensors_file(path)
        else:
            raise FileNotFoundError(f"{path} is neither a diffusers VAE folder nor a .safetensors file")
    if vae_config is None:
        vae_config = VAEConfig.from_dict(config_dict) if config_dict is not None else infer_vae_config(state)
    return vae_config, convert_diffusers_vae_state(state, vae_config)


def load_vae(size: str = "wan2.1", weights: str = "", seed: int = 0) -> tuple[VAEConfig, Params]:
    """The frozen VAE of a run: imported diffusers weights when `weights` is set, else random init of `size`.

    Random init is deterministic in `seed`, so a latents cache and the trainer agree on the same VAE.
    """
    vae_config = vae_config_for(size)
    if weights:
        if isinstance(vae_config, PatchVAEConfig):
            raise ValueError(f"vae.weights={weights!r} with vae.size={size!r}: a pixel patch encoder has no weights")
        return import_diffusers_wan_vae(weights)
    return vae_config, init_vae_params(vae_config, jax.random.key(seed))
