"""Frozen CLIP vision encoder for Wan2.1-I2V image conditioning: first frames -> CLIP image tokens, in the step.

The math is transformers' `CLIPVisionModel` and the output is what diffusers' WanImageToVideoPipeline feeds the
transformer: `hidden_states[-2]`, the tokens after all but the last encoder layer (no post-layernorm). Weights
stay in transformers' names and layouts (a flat dict `vision_model.* -> array`), so a `CLIPVisionModel` or
`CLIPVisionModelWithProjection` folder (Wan's `image_encoder/`) loads with a strict key and shape check.

Preprocessing approximates `CLIPImageProcessor` on device: the centred square crop of a frame resized
(bicubic) to `image_size`, scaled to [0, 1] and normalized with CLIP's mean and std.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
PREFIX = "vision_model."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys a saved CLIP vision folder may hold that the penultimate hidden states never read.
UNUSED_OPTIONAL = ("visual_projection.weight", "vision_model.embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' CLIPVisionConfig the vision tower needs (defaults: a random tiny tower)."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 64
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        """Image tokens per frame: the patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a CLIPVisionConfig dict (a vision folder's config.json, or a full CLIPConfig's `vision_config`)."""
        config = config.get("vision_config", config)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        if values.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
            raise ValueError(f"CLIP config hidden_act={values['hidden_act']!r}; expected one of {sorted(_ACTIVATIONS)}")
        # transformers' CLIPVisionConfig defaults, for keys a saved config leaves out.
        defaults = dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        return cls(**(defaults | values))


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def param_shapes(cfg: CLIPVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the vision tower: transformers' key -> torch shape."""
    d, p = cfg.hidden_size, cfg.patch_size
    shapes = {
        "embeddings.class_embedding": (d,),
        "embeddings.patch_embedding.weight": (d, 3, p, p),
        "embeddings.position_embedding.weight": (cfg.num_tokens, d),
        "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,),
        "post_layernorm.weight": (d,), "post_layernorm.bias": (d,),
    }
    for i in range(cfg.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{layer}self_attn.{proj}.weight": (d, d), f"{layer}self_attn.{proj}.bias": (d,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}{norm}.weight": (d,), f"{layer}{norm}.bias": (d,)}
        shapes |= {
            f"{layer}mlp.fc1.weight": (cfg.intermediate_size, d), f"{layer}mlp.fc1.bias": (cfg.intermediate_size,),
            f"{layer}mlp.fc2.weight": (d, cfg.intermediate_size), f"{layer}mlp.fc2.bias": (d,),
        }
    return {PREFIX + k: v for k, v in shapes.items()}


def init_params(cfg: CLIPVisionConfig, seed: int) -> Params:
    """A random vision tower (CPU smoke runs without weights at hand): normal(0, 0.02), norms at identity."""
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in param_shapes(cfg).items():
        if "norm" in key:
            value = np.ones(shape) if key.endswith("weight") else np.zeros(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        params[key] = value.astype(np.float32)
    return params


def _layer_norm(x: jax.Array, params: Params, name: str, eps: float) -> jax.Array:
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * params[name + ".weight"] + params[name + ".bias"]


def _linear(x: jax.Array, params: Params, name: str) -> jax.Array:
    return x @ params[name + ".weight"].T + params[name + ".bias"]


def penultimate_hidden_states(cfg: CLIPVisionConfig, params: Params, pixel_values: jax.Array) -> jax.Array:
    """CLIP-normalized images [B, image_size, image_size, 3] -> hidden_states[-2] [B, num_tokens, hidden_size]."""
    p, d = cfg.patch_size, cfg.hidden_size
    b, s = pixel_values.shape[0], cfg.image_size
    if pixel_values.shape[1:] != (s, s, 3):
        raise ValueError(f"pixel_values have shape {pixel_values.shape}; expected [B, {s}, {s}, 3]")
    g = s // p
    patches = pixel_values.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, 3 * p * p)
    kernel = params[PREFIX + "embeddings.patch_embedding.weight"].reshape(d, 3 * p * p)
    x = patches @ kernel.T
    cls = jnp.broadcast_to(params[PREFIX + "embeddings.class_embedding"], (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1) + params[PREFIX + "embeddings.position_embedding.weight"]
    x = _layer_norm(x, params, PREFIX + "pre_layrnorm", cfg.layer_norm_eps)
    heads = cfg.num_attention_heads
    act = _ACTIVATIONS[cfg.hidden_act]
    for i in range(cfg.num_hidden_layers - 1):  # hidden_states[-2]: the last layer does not run
        name = f"{PREFIX}encoder.layers.{i}."
        h = _layer_norm(x, params, name + "layer_norm1", cfg.layer_norm_eps)
        split = lambda t: t.reshape(b, -1, heads, d // heads)
        q, k, v = (split(_linear(h, params, f"{name}self_attn.{n}_proj")) for n in ("q", "k", "v"))
        attn = jax.nn.dot_product_attention(q, k, v).reshape(b, -1, d)
        x = x + _linear(attn, params, name + "self_attn.out_proj")
        h = _layer_norm(x, params, name + "layer_norm2", cfg.layer_norm_eps)
        x = x + _linear(act(_linear(h, params, name + "mlp.fc1")), params, name + "mlp.fc2")
    return x


def preprocess(cfg: CLIPVisionConfig, frames: jax.Array) -> jax.Array:
    """uint8 frames [B, H, W, 3] -> CLIP pixel values [B, image_size, image_size, 3]: centred square crop,
    bicubic resize, [0, 1], CLIP mean/std."""
    b, h, w, _ = frames.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = frames[:, top: top + side, left: left + side].astype(jnp.float32) / 255.0
    if side != cfg.image_size:
        x = jax.image.resize(x, (b, cfg.image_size, cfg.image_size, 3), "bicubic", antialias=True)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def encode_frames(cfg: CLIPVisionConfig, params: Params, frames: jax.Array) -> jax.Array:
    """uint8 frames [B, H, W, 3] -> the CLIP image tokens Wan2.1-I2V reads [B, num_tokens, hidden_size],
    without gradients (the encoder is frozen)."""
    params = jax.lax.stop_gradient(params)
    return jax.lax.stop_gradient(penultimate_hidden_states(cfg, params, preprocess(cfg, frames)))


def encode_flops(cfg: CLIPVisionConfig, batch: int) -> float:
    """FLOPs of `encode_frames` for `batch` frames (matmuls and attention; norms and resize left out)."""
    n, d, m = cfg.num_tokens, cfg.hidden_size, cfg.intermediate_size
    patch = 2.0 * (n - 1) * 3 * cfg.patch_size**2 * d
    per_layer = 2.0 * n * d * d * 4 + 2.0 * 2 * n * n * d + 2.0 * n * d * m * 2
    return batch * (patch + (cfg.num_hidden_layers - 1) * per_layer)


# CLIP ViT-H/14, the image encoder of Wan2.1-I2V (open-clip-xlm-roberta-large-vit-huge-14's vision tower).
VIT_H_14 = CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=1280, num_hidden_layers=32,
                            num_attention_heads=16, intermediate_size=5120, hidden_act="gelu")


def encoder_config(config: Any) -> CLIPVisionConfig:
    """The image encoder of a run config: `image.encoder`'s config.json when set; otherwise ViT-H/14 shapes for a
    1280-wide `model.image_dim` and a tiny tower of width `model.image_dim` at `image.size` pixels for the rest."""
    image_dim = int(config.model.image_dim)
    if config.image.encoder:
        path = os.path.join(config.image.encoder, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: image.encoder must be a CLIP vision model folder")
        with open(path) as f:
            cfg = CLIPVisionConfig.from_transformers(json.load(f))
    elif image_dim == VIT_H_14.hidden_size:
        cfg = VIT_H_14
    else:
        cfg = CLIPVisionConfig(image_size=int(config.image.size), hidden_size=image_dim)
    if cfg.hidden_size != image_dim:
        raise ValueError(f"image encoder width {cfg.hidden_size} (image.encoder={config.image.encoder!r}) != "
                         f"model.image_dim={image_dim}")
    return cfg
