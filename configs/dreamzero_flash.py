"""DreamZero's action tuning (configs/dreamzero_action_tune.py) with the fast path of acting in real time.

Usage: --config=configs/dreamzero_flash.py            (the published shapes)
       --config=configs/dreamzero_flash.py:size=tiny  (same structure, CPU-sized, for tests)

  training   DreamZero-Flash: the video's noise level t ~ Beta(7, 1) (t = 1 is noise; the paper's choice, the
             public repo uses Beta(3, 1)), the actions' uniform and independent of it, so that actions learn to
             come out of one step while the video is still noisy (configs/lab.py's `apply_flash`)
  inference  `c.inference`, read as `SamplerOptions(**c.inference)`: one action step, the video's 4 steps ending
             at t = 0.65, DiT step caching by DreamZero's dynamic rule (skip an iteration when the last two
             velocities' cosine similarity exceeds 0.95), CFG 5 on two devices (cfg_parallel=2)
"""

from __future__ import annotations

import os

import ml_collections

from wamjax.config_files import load_config_module

CFG_SCALE = 5.0
STEP_CACHE_THRESHOLD = 0.95
CFG_PARALLEL = 2
VIDEO_STEPS = 4


def _module(name: str):
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _module("dreamzero_action_tune.py").get_config(arg)
    _module("lab.py").apply_flash(c, num_steps=VIDEO_STEPS)
    c.inference.cfg_scale = CFG_SCALE
    c.inference.step_cache_threshold = STEP_CACHE_THRESHOLD
    c.inference.cfg_parallel = CFG_PARALLEL
    return c
