"""DreamZero-like action tuning of a Wan-14B backbone: the setting behind the field's ~9 ZFLOPs figure.

Usage: --config=configs/dreamzero_action_tune.py            (the full-size assumptions below)
       --config=configs/dreamzero_action_tune.py:size=tiny  (same structure, CPU-sized, for tests)
Any key=value the base config takes (size, data) passes through to configs/wam.py.

Assumptions (stated, not fitted to the published number; `python -m wamjax.flops.estimate` reports the ratio):
  model       wan14b (40 layers, dim 5120, ffn 13824), chunk-causal layout (dense: same FLOPs)
  clip        33 frames at 480x832 (Wan 480P) -> latents 9x60x104 -> 14,040 video tokens; 32 action tokens
              (7-D, one per frame transition) and 1 proprio token; 512 cached text tokens
  batch       256 clips (the repo's default global batch for full-size runs)
  steps       100,000 (the repo's default for full-size runs); budget_flops = 9e21, the published figure
  frozen      VAE latents and text embeddings read from caches (data.latents_cache, text.cache); with
              --config.data.latents_cache= (empty) the VAE encoder runs in the step
  memory      bfloat16 compute, full remat, FSDP over all chips, model.attention from
              configs/wam.py's BIG_ATTENTION: check the fit with `python -m wamjax.compile_check`
"""

from __future__ import annotations

import os

import ml_collections

from wamjax.config_files import load_config_module

PUBLISHED_FLOPS = 9e21


def _base_module():
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "wam.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base = _base_module()
    args = base.parse_arg(arg)
    if "stage" in args:
        raise ValueError(f"stage={args['stage']!r}: this config is the action_tune stage only")
    args.setdefault("size", "wan14b")
    c = base.get_config(",".join(f"{k}={v}" for k, v in {**args, "stage": "action_tune"}.items()))
    c.model.attention_layout = "chunk_causal"
    if c.size in ("tiny", "small"):
        return c
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.num_frames = 33
    c.data.resolution = (480, 832)
    c.data.batch_size = 256
    c.text.max_length = 512
    c.data.latents_cache = base.latents_cache_dir(c)  # for this clip shape; see configs/wam.py
    c.train.steps = 100_000
    c.stages.action_tune.budget_flops = PUBLISHED_FLOPS
    return c
