"""Action tuning of the image-to-video backbone (Wan2.1-I2V) on several cameras tiled into one frame.

Usage: --config=configs/i2v_action_tune.py                    (tiny-i2v: CPU-sized, two cameras; run by the tests)
       --config=configs/i2v_action_tune.py:size=wan14b-i2v    (DreamZero's DROID setting below)
       then --config.data.data_dir=... --config.data.stats_path=... (OXE-format data; stage action_tune only)
Any key=value the base config takes (size, data) passes through to configs/wam.py.

  tiny-i2v     taco_play + droid, their primary and wrist cameras (`data.cameras=primary,wrist`) tiled side by
               side into one 32x32 frame (two 32x16 views), 9 frames, chunk-causal, the random CLIP tower
  wan14b-i2v   droid's three cameras (two exterior, wrist) at 176x320 tiled into a 2x2 grid of 352x640, the
               empty cell black (DreamZero); 33 frames, chunk-causal, lr 1e-5; init_from the Wan2.1-I2V-14B-480P
               transformer, image.encoder and vae.weights from the same diffusers folder
"""

from __future__ import annotations

import os

import ml_collections

from wamjax.config_files import load_config_module


def _base_module():
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "wam.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _base_module().pinned_stage_config(arg, "action_tune", size="tiny-i2v", data="oxe")
    if not c.model.image_dim:
        raise ValueError(f"size={c.size!r} is not image-conditioned; use tiny-i2v or wan14b-i2v")
    c.model.attention_layout = "chunk_causal"
    c.model.history = "teacher_forcing"
    c.data.view_layout = "tile"
    if c.size == "tiny-i2v":
        c.data.datasets = "taco_play,droid"
        c.data.cameras = "primary,wrist"
        return c
    c.data.datasets = "droid"
    c.data.cameras = "exterior_image_1_left,exterior_image_2_left,wrist"
    c.data.resolution = (352, 640)
    c.data.num_frames = 33
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.optim.learning_rate = 1e-5
    c.text.max_length = 512
    return c
