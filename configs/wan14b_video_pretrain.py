"""Wan-14B-like video pretraining, against the NVIDIA blog's ~42 ZFLOPs for it: its ~51 ZFLOPs for a full Wan-14B
pretraining plus DreamZero-style tuning, less the ~9 of the tuning (the blog's ~66 ZFLOPs is a 22B video model).

Usage: --config=configs/wan14b_video_pretrain.py            (the full-size assumptions below)
       --config=configs/wan14b_video_pretrain.py:size=tiny  (same structure, CPU-sized, for tests)
Any key=value the base config takes (size, data) passes through to configs/wam.py.

Assumptions (stated, not fitted to the published number; `python -m wamjax.flops.estimate` reports the ratio):
  model       wan14b (40 layers, dim 5120, ffn 13824), bidirectional attention, video mode (no action tokens)
  clip        81 frames (Wan's 5 s at 16 fps) at 480x832 (480P) -> latents 21x60x104 -> 32,760 video tokens;
              512 cached text tokens. One resolution throughout: Wan's real schedule mixes images and lower
              resolutions early, which this single stage does not model
  batch       256 clips (the repo's default global batch for full-size runs)
  steps       100,000 (the repo's default for full-size runs); budget_flops = 42e21, the published figure less tuning
  frozen      VAE latents and text embeddings read from caches (data.latents_cache, text.cache); with
              --config.data.latents_cache= (empty) the VAE encoder runs in the step
  memory      bfloat16 compute, full remat, FSDP over all chips, model.attention from
              configs/wam.py's BIG_ATTENTION: check the fit with `python -m wamjax.compile_check`. One clip
              per chip fits a v5p chip; the global batch of 256 on fewer than 256 chips needs gradient
              accumulation, e.g. --config.train.microbatches=4 on a v5p-128 (43 GiB per chip, compiled)
"""

from __future__ import annotations

import os

import ml_collections

from wamjax.config_files import load_config_module

PUBLISHED_FLOPS = 42e21


def _base_module():
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "wam.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base = _base_module()
    c = base.pinned_stage_config(arg, "video_pretrain", size="wan14b")
    if c.size in ("tiny", "small"):
        return c
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.num_frames = 81
    c.data.resolution = (480, 832)
    c.data.batch_size = 256
    c.text.max_length = 512
    c.data.latents_cache = base.latents_cache_dir(c)  # for this clip shape; see configs/wam.py
    c.train.steps = 100_000
    c.stages.video_pretrain.budget_flops = PUBLISHED_FLOPS
    return c
