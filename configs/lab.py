"""The CPU lab: a world-action model a 2-core machine trains in minutes that still sees where things are.

Usage: --config=configs/lab.py                        (action tuning on Meta-World expert episodes)
       --config=configs/lab.py:stage=video_pretrain   (video only, e.g. on action-free videos)
       --config=configs/lab.py:stage=all              (both, back to back)
       --config=configs/lab.py:flash=1                (DreamZero-Flash: video t ~ Beta(7,1), actions uniform)
Then set --config.data.data_dir (a `wamjax.jobs.collect_sim` dataset), --config.data.stats_path and, to
train from cached latents, --config.data.latents_cache (or per stage, --config.stages.<stage>.latents_cache).
`python benchmarks/closed_loop.py` collects, encodes, trains and evaluates it end to end.

  cameras    Meta-World's corner camera and the gripper camera, 64x64 each, on a views axis (tokens layout)
  latents    raw 4x4 pixel patches (vae.size=pixels4: 16x16x48 per view and latent frame, no weights, zero
             FLOPs): a random Wan VAE keeps no positions and costs ~55x the model's FLOPs at this size; the
             real Wan VAE path is unchanged for pods (benchmarks/RESULTS.md has the measurement)
  tokens     DiT patch 2x2 -> 64 tokens per view and latent frame; 5 frames at stride 2 (8 environment steps)
             -> 2 latent frames x 2 views x 64 = 256 video tokens, 4 action tokens (each held for 2 steps),
             1 state token
  model      size=lab: 2 heads of 64 (128 wide), 4 layers, ffn 512 (about 0.9M parameters): in the sweep of
             benchmarks/RESULTS.md the cheapest shape whose actions depend on its cameras
  instruction  the task's template (Meta-World's task string), hashed text embeddings (no text encoder)
  flash=1    trains with the video's noise biased high (Beta(7,1): t = 1 is noise) and the actions' uniform,
             drawn independently, so that actions learn to come out of one step while the video is still
             noisy; `inference` then holds the matching sampler settings (one action step, the video stopping at
             t = 0.65, below which Beta(7,1) puts only 5% of its draws), read as SamplerOptions(**c.inference)
"""

from __future__ import annotations

import os

import ml_collections

from wamjax.config_files import load_config_module

RESOLUTION = (64, 64)  # per camera
CAMERAS = "primary,wrist"
NUM_FRAMES = 5
FRAME_STRIDE = 2
BATCH = 8
STEPS = 3000
LEARNING_RATE = 1e-3
VAE = "pixels4"
TASKS = "button-press-topdown-v3,reach-v3,push-v3"


def _base_module():
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "wam.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base = _base_module()
    args = base.parse_arg(arg)
    unknown = sorted(set(args) - {"stage", "size", "flash"})
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown} of configs/lab.py; known: flash, size, stage")
    if args.get("flash", "0") not in ("0", "1"):
        raise ValueError(f"flash={args['flash']!r} of configs/lab.py; expected 0 or 1")
    c = base.get_config(f"size={args.get('size', 'lab')},stage={args.get('stage', 'action_tune')},data=oxe")
    c.vae.size = VAE
    c.data.datasets = "metaworld"
    c.data.resolution = RESOLUTION
    c.data.cameras = CAMERAS
    c.data.view_layout = "tokens"
    c.data.num_frames = NUM_FRAMES
    c.data.frame_stride = FRAME_STRIDE
    c.data.batch_size = BATCH
    c.optim.learning_rate = LEARNING_RATE
    c.optim.warmup_steps = 100
    c.train.steps = STEPS
    c.train.log_every = 100
    c.checkpoint.every_steps = 1000
    c.eval.closed_loop_tasks = TASKS
    c.eval.closed_loop_resolution = RESOLUTION
    if args.get("flash") == "1":
        apply_flash(c)
    return c


FLASH_VIDEO_BETA = (7.0, 1.0)
FLASH_VIDEO_STOP_T = 0.65  # Beta(7, 1) draws fall below it 5% of the time (0.65**7)


def apply_flash(c: ml_collections.ConfigDict, num_steps: int = 4) -> ml_collections.ConfigDict:
    """The DreamZero-Flash recipe on a run config: per-modality time sampling for training and `c.inference`,
    the sampler settings that go with it (`SamplerOptions(**c.inference)`)."""
    c.diffusion.video_time_sampling = "beta"
    c.diffusion.beta_a, c.diffusion.beta_b = FLASH_VIDEO_BETA
    c.diffusion.action_time_sampling = "uniform"
    c.diffusion.independent_action_time = True
    c.inference = ml_collections.ConfigDict({
        "num_steps": num_steps, "action_steps": 1, "video_stop_t": FLASH_VIDEO_STOP_T,
        "shift": float(c.diffusion.shift),
    })
    return c
