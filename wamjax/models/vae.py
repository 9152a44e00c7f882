"""Wan video VAEs (causal 3D convolutions), frozen, as pure JAX functions: Wan 2.1 (16 channels, 4x time / 8x
space compression) and Wan 2.2 (48 channels, 4x time / 16x space: 2x2 pixel patches in, residual down and up blocks
whose shortcuts average or duplicate pixels across space, time and channels; diffusers' `is_residual=True`).

Parameters are a plain pytree of nested dicts whose key path is diffusers' `AutoencoderKLWan` module path
(`encoder/down_blocks/3/time_conv/kernel`), with kernels channels-last (`[kt, kh, kw, in, out]` for 3D,
`[kh, kw, in, out]` for 2D) and RMS-norm gains as `[C]` vectors. Activations are channels-last
`[B, T, H, W, C]`.

diffusers encodes a clip chunk by chunk (the first frame, then 4-frame chunks) with a feature cache of the
last two frames per causal convolution. Processing the whole clip at once is mathematically identical:
  * a cached causal conv equals a conv over the whole clip with `kt - 1` zero frames in front;
  * a temporal downsample keeps frame 0 as is and runs a stride-2 valid conv over the whole clip
    (windows [0..2], [2..4], ...), which is what the cached chunks compute;
  * a temporal upsample keeps frame 0 as is and runs a causal conv over frames 1.. only (diffusers marks the
    first chunk "Rep" and never feeds frame 0 into that conv), doubling each of those frames;
  * Wan 2.2's averaging shortcut pads the first chunk with one zero frame before pairing frames; on the whole
    clip (1 + 2k frames at that level) that is one zero frame in front, then pairs;
  * Wan 2.2's duplicating shortcut drops the first duplicated frame of the first chunk only: on the whole clip,
    duplicate every frame and drop the first one.
The parity tests against diffusers check this.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from wamjax.models.patch_vae import PatchVAEConfig, patch_config_for, patch_decode, patch_encode

Params = dict[str, Any]
AnyVAEConfig = Any  # VAEConfig | PatchVAEConfig

# Wan 2.1 latent statistics (diffusers' AutoencoderKLWan defaults), used to normalize latents for the DiT.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Wan 2.2 (TI2V-5B) latent statistics, from the published `vae/config.json`.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

_RMS_EPS = 1e-12  # torch.nn.functional.normalize's default eps, which diffusers' WanRMS_norm uses.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan VAE; field names follow diffusers' `AutoencoderKLWan` config (`in_channels` and
    `out_channels` count the patchified channels: 12 for Wan 2.2's 2x2 patches of RGB)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    is_residual: bool = False
    patch_size: int | None = None

    def __post_init__(self) -> None:
        p = self.patch_size or 1
        if p < 1:
            raise ValueError(f"VAE patch_size={self.patch_size}; expected None or >= 1")
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % (p * p):
                raise ValueError(f"VAE {name}={getattr(self, name)} is not a multiple of patch_size^2 = {p * p}")
        if self.in_channels // (p * p) != self.out_channels // (p * p):
            raise ValueError(f"VAE in_channels={self.in_channels} and out_channels={self.out_channels} encode and "
                             "decode videos of different channel counts")
        if self.is_residual and self.attn_scales:
            raise ValueError(f"VAE attn_scales={list(self.attn_scales)} with is_residual=True: the residual (Wan 2.2) "
                             "down blocks have no attention layers")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries; expected "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; expected z_dim={self.z_dim}")

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** len(self.temperal_downsample) * (self.patch_size or 1)

    @property
    def video_channels(self) -> int:
        """Channels of the videos it encodes (RGB: 3), before patchifying."""
        return self.in_channels // (self.patch_size or 1) ** 2

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim if self.decoder_base_dim is not None else self.base_dim

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VAEConfig:
        """Builds a config from a diffusers `config.json` mapping; keys starting with `_` are ignored."""
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        values.pop("dropout", None)  # inference only: no dropout
        # Derived in diffusers from the architecture; checked against it rather than stored.
        derived = {"scale_factor_temporal": values.pop("scale_factor_temporal", None),
                   "scale_factor_spatial": values.pop("scale_factor_spatial", None)}
        values.pop("clip_output", None)  # the original Wan 2.2 VAE's flag, read by no diffusers code
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown VAE config key(s) {unknown}; known keys: {sorted(known)}")
        for key in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if key in values:
                values[key] = tuple(values[key])
        config = cls(**values)
        actual = {"scale_factor_temporal": config.temporal_compression,
                  "scale_factor_spatial": config.spatial_compression}
        for key, value in derived.items():
            if value is not None and int(value) != actual[key]:
                logging.warning("VAE config %s=%s, but its architecture compresses %dx; using %d", key, value,
                                actual[key], actual[key])
        return config

    def to_dict(self) -> dict[str, Any]:
        """The diffusers `AutoencoderKLWan` config equivalent to this one."""
        d = dataclasses.asdict(self)
        d |= {"scale_factor_temporal": self.temporal_compression, "scale_factor_spatial": self.spatial_compression}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def wan22_vae_config(**overrides: Any) -> VAEConfig:
    """The published Wan 2.2 (TI2V-5B) VAE config, with `overrides` (a smaller sibling keeps its structure)."""
    values = dict(base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                  patch_size=2, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
    return VAEConfig(**(values | overrides))


VAE_SIZES = ("wan2.1", "wan2.2", "tiny", "tiny-wan2.2", "pixels<p>")


def vae_config_for(size: str) -> VAEConfig | PatchVAEConfig:
    """Named VAE configs: `wan2.1` (the published 127M-parameter VAE), `wan2.2` (the 48-channel, 16x VAE of
    Wan2.2-TI2V-5B), `tiny` and `tiny-wan2.2` (random, same structures, for CPU runs and tests) and `pixels<p>`
    (raw p x p pixel patches, no weights: CPU runs whose model must see where things are)."""
    if size in ("wan2.1", "full", "base"):
        return VAEConfig()
    if size == "wan2.2":
        return wan22_vae_config()
    if size == "tiny":
        return VAEConfig(base_dim=16, num_res_blocks=1)
    if size == "tiny-wan2.2":
        return wan22_vae_config(base_dim=16, decoder_base_dim=24, num_res_blocks=1)
    patches = patch_config_for(size)
    if patches is not None:
        return patches
    raise KeyError(f"unknown VAE size {size!r}; expected one of {list(VAE_SIZES)} (e.g. pixels4)")


# ----------------------------------------------------------------------------------------------------
# Layout: the list of layers and every parameter's shape, in diffusers' module order.
# ----------------------------------------------------------------------------------------------------


def _encoder_layers(cfg: VAEConfig) -> list[tuple[str, int, int, str]]:
    """(kind, in_dim, out_dim, resample_mode) for each entry of `encoder.down_blocks`."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    layers = []
    scale = 1.0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(cfg.num_res_blocks):
            layers.append(("res", in_dim, out_dim, ""))
            if scale in cfg.attn_scales:
                layers.append(("attn", out_dim, out_dim, ""))
            in_dim = out_dim
        if i != len(cfg.dim_mult) - 1:
            mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
            layers.append(("resample", out_dim, out_dim, mode))
            scale /= 2.0
    return layers


def _residual_down_blocks(cfg: VAEConfig) -> list[tuple[int, int, str]]:
    """(in_dim, out_dim, downsample_mode) for each residual (Wan 2.2) `encoder.down_blocks` entry; mode "" for
    the last, which does not downsample."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        mode = ""
        if i != len(cfg.dim_mult) - 1:
            mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        blocks.append((in_dim, out_dim, mode))
    return blocks


def _decoder_blocks(cfg: VAEConfig) -> list[tuple[int, int, str]]:
    """(in_dim, out_dim, upsample_mode) for each entry of `decoder.up_blocks`."""
    dims = [cfg.decoder_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temperal_upsample = cfg.temperal_downsample[::-1]
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i > 0 and not cfg.is_residual:
            # The previous block's upsampler halves the channels (Wan 2.1).
            in_dim = in_dim // 2
        mode = ""
        if i != len(cfg.dim_mult) - 1:
            mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
        blocks.append((in_dim, out_dim, mode))
    return blocks


def _conv3d_shapes(prefix: str, cin: int, cout: int, k: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.kernel": (*k, cin, cout), f"{prefix}.bias": (cout,)}


def _conv2d_shapes(prefix: str, cin: int, cout: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.kernel": (k, k, cin, cout), f"{prefix}.bias": (cout,)}


def _res_shapes(prefix: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm1.gamma": (cin,)}
    shapes |= _conv3d_shapes(f"{prefix}.conv1", cin, cout, (3, 3, 3))
    shapes[f"{prefix}.norm2.gamma"] = (cout,)
    shapes |= _conv3d_shapes(f"{prefix}.conv2", cout, cout, (3, 3, 3))
    if cin != cout:
        shapes |= _conv3d_shapes(f"{prefix}.conv_shortcut", cin, cout, (1, 1, 1))
    return shapes


def _attn_shapes(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.norm.gamma": (dim,)}
    shapes |= _conv2d_shapes(f"{prefix}.to_qkv", dim, 3 * dim, 1)
    shapes |= _conv2d_shapes(f"{prefix}.proj", dim, dim, 1)
    return shapes


def _resample_shapes(prefix: str, dim: int, mode: str, upsample_out_dim: int) -> dict[str, tuple[int, ...]]:
    if mode.startswith("upsample"):
        shapes = _conv2d_shapes(f"{prefix}.resample.1", dim, upsample_out_dim, 3)
        if mode == "upsample3d":
            shapes |= _conv3d_shapes(f"{prefix}.time_conv", dim, 2 * dim, (3, 1, 1))
        return shapes
    shapes = _conv2d_shapes(f"{prefix}.resample.1", dim, dim, 3)
    if mode == "downsample3d":
        shapes |= _conv3d_shapes(f"{prefix}.time_conv", dim, dim, (3, 1, 1))
    return shapes


def _mid_shapes(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    shapes = _res_shapes(f"{prefix}.resnets.0", dim, dim)
    shapes |= _attn_shapes(f"{prefix}.attentions.0", dim)
    shapes |= _res_shapes(f"{prefix}.resnets.1", dim, dim)
    return shapes


def vae_param_shapes(vae_config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's dotted name (diffusers' module path, leaf `kernel`/`bias`/`gamma`) and JAX shape."""
    cfg = vae_config
    shapes = _conv3d_shapes("encoder.conv_in", cfg.in_channels, cfg.base_dim, (3, 3, 3))
    out_dim = cfg.base_dim
    if cfg.is_residual:
        for i, (cin, cout, mode) in enumerate(_residual_down_blocks(cfg)):
            prefix = f"encoder.down_blocks.{i}"
            for j in range(cfg.num_res_blocks):
                shapes |= _res_shapes(f"{prefix}.resnets.{j}", cin if j == 0 else cout, cout)
            if mode:
                shapes |= _resample_shapes(f"{prefix}.downsampler", cout, mode, cout)
            out_dim = cout
    for i, (kind, cin, cout, mode) in enumerate(() if cfg.is_residual else _encoder_layers(cfg)):
        prefix = f"encoder.down_blocks.{i}"
        if kind == "res":
            shapes |= _res_shapes(prefix, cin, cout)
        elif kind == "attn":
            shapes |= _attn_shapes(prefix, cout)
        else:
            shapes |= _resample_shapes(prefix, cout, mode, cout)
        out_dim = cout
    shapes |= _mid_shapes("encoder.mid_block", out_dim)
    shapes["encoder.norm_out.gamma"] = (out_dim,)
    shapes |= _conv3d_shapes("encoder.conv_out", out_dim, 2 * cfg.z_dim, (3, 3, 3))
    shapes |= _conv3d_shapes("quant_conv", 2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1))
    shapes |= _conv3d_shapes("post_quant_conv", cfg.z_dim, cfg.z_dim, (1, 1, 1))

    top = cfg.decoder_dim * cfg.dim_mult[-1]
    shapes |= _conv3d_shapes("decoder.conv_in", cfg.z_dim, top, (3, 3, 3))
    shapes |= _mid_shapes("decoder.mid_block", top)
    for i, (cin, cout, mode) in enumerate(_decoder_blocks(cfg)):
        prefix = f"decoder.up_blocks.{i}"
        for j in range(cfg.num_res_blocks + 1):
            shapes |= _res_shapes(f"{prefix}.resnets.{j}", cin if j == 0 else cout, cout)
        if mode and cfg.is_residual:
            shapes |= _resample_shapes(f"{prefix}.upsampler", cout, mode, cout)
        elif mode:
            shapes |= _resample_shapes(f"{prefix}.upsamplers.0", cout, mode, cout // 2)
        out_dim = cout
    shapes["decoder.norm_out.gamma"] = (out_dim,)
    shapes |= _conv3d_shapes("decoder.conv_out", out_dim, cfg.out_channels, (3, 3, 3))
    return shapes


def unflatten_params(flat: Mapping[str, Any]) -> Params:
    """Dotted names -> nested dicts (the params pytree)."""
    tree: Params = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten_params(params: Params) -> dict[str, Any]:
    """Nested dicts -> dotted names, the inverse of `unflatten_params`."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[".".join(str(p.key) for p in path)] = leaf
    return flat


def init_vae_params(vae_config: AnyVAEConfig, rng: jax.Array) -> Params:
    """Fresh random parameters (PyTorch's default conv init: uniform(+-1/sqrt(fan_in)); norm gains one); a pixel
    patch encoder has none ({})."""
    if isinstance(vae_config, PatchVAEConfig):
        return {}
    return _init_wan_vae_params(vae_config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_wan_vae_params(vae_config: VAEConfig, rng: jax.Array) -> Params:
    shapes = vae_param_shapes(vae_config)
    fan_in = {
        name.removesuffix(".kernel"): math.prod(shape[:-1])
        for name, shape in shapes.items()
        if name.endswith(".kernel")
    }
    # One draw sliced into every tensor: per-tensor draws make XLA compile one RNG kernel per shape (minutes).
    sizes = [math.prod(shape) for shape in shapes.values()]
    uniform = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    flat = {}
    offset = 0
    for (name, shape), size in zip(shapes.items(), sizes, strict=True):
        if name.endswith(".gamma"):
            flat[name] = jnp.ones(shape, jnp.float32)
        else:
            bound = 1.0 / math.sqrt(fan_in[name.rsplit(".", 1)[0]])
            flat[name] = uniform[offset : offset + size].reshape(shape) * bound
        offset += size
    return unflatten_params(flat)


def vae_param_count(vae_config: VAEConfig) -> int:
    """Number of parameters, counted abstractly (nothing is allocated)."""
    abstract = jax.eval_shape(functools.partial(init_vae_params, vae_config), jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))


# ----------------------------------------------------------------------------------------------------
# Layers (channels-last [B, T, H, W, C]).
# ----------------------------------------------------------------------------------------------------


def _conv3d(x: jax.Array, p: Params, stride: tuple[int, int, int] = (1, 1, 1), causal: bool = True) -> jax.Array:
    """Conv3d; `causal` pads `kt - 1` zero frames in front and `(k - 1) / 2` pixels on each spatial side."""
    kt, kh, kw = p["kernel"].shape[:3]
    padding = [(kt - 1, 0) if causal else (0, 0), ((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2]
    y = jax.lax.conv_general_dilated(
        x,
        p["kernel"].astype(x.dtype),
        window_strides=stride,
        padding=padding,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
    )
    return y + p["bias"].astype(x.dtype)


def _conv2d_frames(x: jax.Array, p: Params, stride: int = 1, padding: Any = "SAME") -> jax.Array:
    """Conv2d applied to every frame independently."""
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t, *x.shape[2:]),
        p["kernel"].astype(x.dtype),
        window_strides=(stride, stride),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = y + p["bias"].astype(x.dtype)
    return y.reshape(b, t, *y.shape[1:])


def _rms_norm(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """diffusers' WanRMS_norm: L2-normalize over channels, times sqrt(C) and a gain (float32 statistics)."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    normalized = (x32 / jnp.maximum(norm, _RMS_EPS)).astype(x.dtype)
    return normalized * math.sqrt(x.shape[-1]) * gamma.astype(x.dtype)


def _residual_block(x: jax.Array, p: Params) -> jax.Array:
    shortcut = _conv3d(x, p["conv_shortcut"]) if "conv_shortcut" in p else x
    x = _conv3d(jax.nn.silu(_rms_norm(x, p["norm1"]["gamma"])), p["conv1"])
    x = _conv3d(jax.nn.silu(_rms_norm(x, p["norm2"]["gamma"])), p["conv2"])
    return x + shortcut


def _attention_block(x: jax.Array, p: Params) -> jax.Array:
    """Single-head self-attention over the pixels of each frame."""
    b, t, h, w, c = x.shape
    y = _rms_norm(x, p["norm"]["gamma"]).reshape(b * t, h * w, c)
    qkv = y @ p["to_qkv"]["kernel"][0, 0].astype(x.dtype) + p["to_qkv"]["bias"].astype(x.dtype)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    logits = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    y = jnp.einsum("nqk,nkc->nqc", weights, v)
    y = y @ p["proj"]["kernel"][0, 0].astype(x.dtype) + p["proj"]["bias"].astype(x.dtype)
    return y.reshape(b, t, h, w, c) + x


def _upsample_nearest2x(x: jax.Array) -> jax.Array:
    # nearest-exact with an integer factor of 2 repeats every pixel twice.
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


def _resample(x: jax.Array, p: Params, mode: str) -> jax.Array:
    if mode == "upsample3d" and x.shape[1] > 1:
        b, t, h, w, c = x.shape
        doubled = _conv3d(x[:, 1:], p["time_conv"])  # [B, T-1, H, W, 2C]: two output frames per input frame
        doubled = jnp.stack([doubled[..., :c], doubled[..., c:]], axis=2).reshape(b, 2 * (t - 1), h, w, c)
        x = jnp.concatenate([x[:, :1], doubled], axis=1)
    if mode.startswith("upsample"):
        return _conv2d_frames(_upsample_nearest2x(x), p["resample"]["1"], padding=((1, 1), (1, 1)))
    # diffusers pads right/bottom by one pixel, then a valid stride-2 conv.
    x = _conv2d_frames(x, p["resample"]["1"], stride=2, padding=((0, 1), (0, 1)))
    if mode == "downsample3d" and x.shape[1] > 1:
        reduced = _conv3d(x, p["time_conv"], stride=(2, 1, 1), causal=False)
        x = jnp.concatenate([x[:, :1], reduced], axis=1)
    return x


def _patchify(x: jax.Array, p: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, T, H / p, W / p, C * p * p], channels ordered (c, column, row) as diffusers'
    `patchify`."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(b, t, h // p, w // p, c * p * p)


def _unpatchify(x: jax.Array, p: int) -> jax.Array:
    """Inverse of `_patchify`."""
    if p == 1:
        return x
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p)  # (c, column, row)
    return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(b, t, h * p, w * p, cpp // (p * p))


def _average_down(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
    """diffusers' AvgDown3D: fold factor_t x factor_s x factor_s neighbours into channels (zero frames in front
    to a multiple of factor_t), then average groups of consecutive channels down to `out_dim`."""
    b, t, h, w, c = x.shape
    pad_t = (factor_t - t % factor_t) % factor_t
    x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    t = (t + pad_t) // factor_t
    x = x.reshape(b, t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # channel index (c, dt, dh, dw)
    folded = c * factor_t * factor_s * factor_s
    x = x.reshape(b, t, h // factor_s, w // factor_s, out_dim, folded // out_dim)
    return jnp.mean(x, axis=-1)


def _duplicate_up(x: jax.Array, out_dim: int, factor_t: int, factor_s: int) -> jax.Array:
    """diffusers' DupUp3D on a whole clip: repeat channels, unfold them into factor_t x factor_s x factor_s
    neighbours, and drop the first factor_t - 1 frames (the first chunk's)."""
    b, t, h, w, c = x.shape
    repeats = out_dim * factor_t * factor_s * factor_s // c
    x = jnp.repeat(x, repeats, axis=-1).reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
    return x[:, factor_t - 1 :]


def _mid_block(x: jax.Array, p: Params) -> jax.Array:
    x = _residual_block(x, p["resnets"]["0"])
    x = _attention_block(x, p["attentions"]["0"])
    return _residual_block(x, p["resnets"]["1"])


def _check_video(vae_config: AnyVAEConfig, video: jax.Array) -> None:
    if video.ndim != 5 or video.shape[-1] != vae_config.video_channels:
        raise ValueError(
            f"video has shape {video.shape}; expected [B, T, H, W, {vae_config.video_channels}] (channels-last)"
        )
    t, h, w = video.shape[1:4]
    tc, sc = vae_config.temporal_compression, vae_config.spatial_compression
    if (t - 1) % tc != 0:
        raise ValueError(f"video has {t} frames; expected 1 + {tc}k frames (causal {tc}x time compression)")
    if h % sc or w % sc:
        raise ValueError(f"video frames are {h}x{w}; expected height and width divisible by {sc}")


def _in_batch_chunks(fn: Any, x: jax.Array, batch_chunk: int) -> jax.Array:
    """fn over `batch_chunk` clips at a time (a sequential loop), bounding activation memory."""
    b = x.shape[0]
    if batch_chunk <= 0 or batch_chunk >= b:
        return fn(x)
    if b % batch_chunk:
        raise ValueError(f"batch of {b} clips is not divisible by batch_chunk={batch_chunk}")
    y = jax.lax.map(fn, x.reshape(b // batch_chunk, batch_chunk, *x.shape[1:]))
    return y.reshape(b, *y.shape[2:])


@functools.partial(jax.jit, static_argnums=0, static_argnames="batch_chunk")
def vae_encode(vae_config: VAEConfig, params: Params, video: jax.Array, *, batch_chunk: int = 0) -> jax.Array:
    """Posterior mean (diffusers' `latent_dist.mean`, unnormalized) of a batch of clips.

    video: [B, T, H, W, 3] in [-1, 1], T = 1 + 4k. Returns [B, 1 + k, H / s, W / s, z_dim], s the spatial
    compression (8 for Wan 2.1, 16 for Wan 2.2).
    `batch_chunk` > 0 encodes that many clips at a time (less memory, same result).
    """
    _check_video(vae_config, video)
    if isinstance(vae_config, PatchVAEConfig):
        return patch_encode(vae_config, video)
    return _in_batch_chunks(functools.partial(_encode, vae_config, params), video, batch_chunk)


def _encode(vae_config: VAEConfig, params: Params, video: jax.Array) -> jax.Array:
    enc = params["encoder"]
    x = _conv3d(_patchify(video, vae_config.patch_size or 1), enc["conv_in"])
    for i, (_, cout, mode) in enumerate(_residual_down_blocks(vae_config) if vae_config.is_residual else ()):
        block = enc["down_blocks"][str(i)]
        shortcut = _average_down(x, cout, 2 if mode == "downsample3d" else 1, 2 if mode else 1)
        for j in range(vae_config.num_res_blocks):
            x = _residual_block(x, block["resnets"][str(j)])
        if mode:
            x = _resample(x, block["downsampler"], mode)
        x = x + shortcut
    for i, (kind, _, _, mode) in enumerate(() if vae_config.is_residual else _encoder_layers(vae_config)):
        layer = enc["down_blocks"][str(i)]
        if kind == "res":
            x = _residual_block(x, layer)
        elif kind == "attn":
            x = _attention_block(x, layer)
        else:
            x = _resample(x, layer, mode)
    x = _mid_block(x, enc["mid_block"])
    x = _conv3d(jax.nn.silu(_rms_norm(x, enc["norm_out"]["gamma"])), enc["conv_out"])
    moments = _conv3d(x, params["quant_conv"])
    return moments[..., : vae_config.z_dim]


@functools.partial(jax.jit, static_argnums=0, static_argnames="batch_chunk")
def vae_decode(vae_config: VAEConfig, params: Params, latents: jax.Array, *, batch_chunk: int = 0) -> jax.Array:
    """Video [B, 1 + 4(T' - 1), sH', sW', 3] in [-1, 1] (s the spatial compression) from unnormalized latents
    [B, T', H', W', z_dim].

    `batch_chunk` > 0 decodes that many clips at a time (less memory, same result).
    """
    if latents.ndim != 5 or latents.shape[-1] != vae_config.z_dim:
        raise ValueError(f"latents have shape {latents.shape}; expected [B, T, H, W, {vae_config.z_dim}]")
    if isinstance(vae_config, PatchVAEConfig):
        return patch_decode(vae_config, latents)
    return _in_batch_chunks(functools.partial(_decode, vae_config, params), latents, batch_chunk)


def _decode(vae_config: VAEConfig, params: Params, latents: jax.Array) -> jax.Array:
    dec = params["decoder"]
    x = _conv3d(latents, params["post_quant_conv"])
    x = _conv3d(x, dec["conv_in"])
    x = _mid_block(x, dec["mid_block"])
    for i, (_, cout, mode) in enumerate(_decoder_blocks(vae_config)):
        block = dec["up_blocks"][str(i)]
        shortcut = x
        for j in range(vae_config.num_res_blocks + 1):
            x = _residual_block(x, block["resnets"][str(j)])
        if mode and vae_config.is_residual:
            x = _resample(x, block["upsampler"], mode)
            x = x + _duplicate_up(shortcut, cout, 2 if mode == "upsample3d" else 1, 2)
        elif mode:
            x = _resample(x, block["upsamplers"]["0"], mode)
    x = _conv3d(jax.nn.silu(_rms_norm(x, dec["norm_out"]["gamma"])), dec["conv_out"])
    return jnp.clip(_unpatchify(x, vae_config.patch_size or 1), -1.0, 1.0)


def normalize_latents(vae_config: VAEConfig, latents: jax.Array) -> jax.Array:
    """(latents - mean) / std per channel: the scale the DiT is trained on (as in diffusers' WanPipeline)."""
    mean = jnp.asarray(np.asarray(vae_config.latents_mean, np.float32), latents.dtype)
    std = jnp.asarray(np.asarray(vae_config.latents_std, np.float32), latents.dtype)
    return (latents - mean) / std


def denormalize_latents(vae_config: VAEConfig, latents: jax.Array) -> jax.Array:
    """Inverse of `normalize_latents`: DiT-scale latents back to what `vae_decode` expects."""
    mean = jnp.asarray(np.asarray(vae_config.latents_mean, np.float32), latents.dtype)
    std = jnp.asarray(np.asarray(vae_config.latents_std, np.float32), latents.dtype)
    return latents * std + mean


def latent_shape(vae_config: VAEConfig, video_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Latent shape [B, T', H', W', z_dim] for a video shape [B, T, H, W, 3]."""
    b, t, h, w = video_shape[:4]
    tc, sc = vae_config.temporal_compression, vae_config.spatial_compression
    return (b, 1 + (t - 1) // tc, h // sc, w // sc, vae_config.z_dim)


def frames_to_video(frames: jax.Array) -> jax.Array:
    """uint8 frames [..., 3] in [0, 255] -> float32 video in [-1, 1], the range `vae_encode` expects."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def video_to_frames(video: Any) -> np.ndarray:
    """Video in [-1, 1] (as `vae_decode` gives it) -> host uint8 frames in [0, 255], rounded and clipped."""
    return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
