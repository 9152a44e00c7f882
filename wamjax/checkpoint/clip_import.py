"""Import of a transformers CLIP vision tower (Wan2.1-I2V's `image_encoder/`) into wamjax.models.clip params."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from wamjax.checkpoint.wan_import import WeightImportError, read_safetensors_folder, to_numpy
from wamjax.models import clip

Params = Any


def state_dict_to_params(state: Mapping[str, Any], cfg: clip.CLIPVisionConfig, source: str = "state dict") -> Params:
    """A transformers CLIP vision state dict (numpy or torch values) -> params, strictly (errors name the key)."""
    expected = clip.param_shapes(cfg)
    for key in sorted(state):
        if key not in expected and key not in clip.UNUSED_OPTIONAL:
            raise WeightImportError(f"unexpected key {key!r} in the CLIP vision {source}")
    params = {}
    for key, shape in expected.items():
        if key not in state:
            raise WeightImportError(f"missing key {key!r} in the CLIP vision {source}")
        value = to_numpy(state[key]).astype(np.float32)
        if tuple(value.shape) != shape:
            raise WeightImportError(f"key {key!r} has shape {tuple(value.shape)} in the CLIP vision {source}; "
                                    f"expected {shape} for its config")
        params[key] = value
    return params


def load(path: str) -> tuple[clip.CLIPVisionConfig, Params]:
    """(config, params) of a transformers CLIPVisionModel(WithProjection) folder written by `save_pretrained`
    (Wan2.1-I2V's `image_encoder/`)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: image.encoder must be a CLIP vision model folder")
    with open(config_path) as f:
        cfg = clip.CLIPVisionConfig.from_transformers(json.load(f))
    state = read_safetensors_folder(path, weights_name="model")
    return cfg, state_dict_to_params(state, cfg, source=f"folder {path}")


def encoder_params(config: Any, cfg: clip.CLIPVisionConfig) -> Params:
    """The image encoder's weights: `image.encoder`'s folder, or a random tower seeded by `image.seed`."""
    if config.image.encoder:
        loaded_cfg, params = load(config.image.encoder)
        if loaded_cfg != cfg:
            raise ValueError(f"image.encoder={config.image.encoder!r}: config changed while loading")
        return params
    return clip.init_params(cfg, int(config.image.seed))
