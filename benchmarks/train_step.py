"""Times the jitted train step of one model size and prints step time, tokens/s and MFU.

  python benchmarks/train_step.py --size=wan1.3b --frames=33 --resolution=480,832 --batch=1 --dtype=bfloat16
  python benchmarks/train_step.py --size=tiny          # CPU smoke figure

Latents are fed directly (the frozen VAE is benchmarked by benchmarks/vae_encode.py); the mesh is every local
device on fsdp. MFU is model FLOPs (3x forward, no remat recompute) over the devices' peak.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from wamjax import config_files

_SIZE = flags.DEFINE_string("size", "tiny", "Model size.")
_STAGE = flags.DEFINE_string("stage", "action_tune", "video_pretrain (video tokens) or action_tune (joint).")
_FRAMES = flags.DEFINE_integer("frames", 9, "Video frames per clip (1+4k).")
_RES = flags.DEFINE_list("resolution", ["32", "32"], "H,W in pixels.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (params stay float32).")
_REMAT = flags.DEFINE_string("remat", "none", "model.remat_policy.")
_ATTN = flags.DEFINE_string("attention", "dot_product", "model.attention kernel.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")


def _config():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "wam.py")
    config = config_files.get_config(f"{path}:size={_SIZE.value},stage={_STAGE.value}")
    config.data.num_frames = _FRAMES.value
    config.data.resolution = tuple(int(x) for x in _RES.value)
    config.data.batch_size = _BATCH.value
    config.data.latents_cache = "benchmark"  # latents are fed directly; no VAE in the step
    config.model.dtype = _DTYPE.value
    config.model.remat_policy = _REMAT.value
    config.model.attention = _ATTN.value
    return config


def main(argv) -> None:
    del argv
    import flax.linen as nn

    from wamjax.flops.peak import peak_flops_per_device
    from wamjax.flops.stage import train_step_flops
    from wamjax.parallel.mesh import batch_sharding, logical_rules, make_mesh
    from wamjax.stages import stage_spec
    from wamjax.train.setup import jit_train_step, sharded_init
    from wamjax.train.stage_step import build_stage_step

    config = _config()
    stage = _STAGE.value
    spec = stage_spec(config, stage)  # the step the training loop builds for this stage, latents in the batch
    cfg = spec.model
    h, w = spec.clip.resolution
    latent = spec.latent_shape
    num_actions = spec.action_tokens
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh.rules)
    flops = train_step_flops(spec)
    peak = peak_flops_per_device()
    b = spec.clip.batch_size
    rng = np.random.default_rng(0)
    host = {
        "latents": rng.standard_normal((b, *latent)).astype(np.float32),
        "text_embeddings": rng.standard_normal((b, spec.text_length, cfg.text_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (b, max(num_actions, 1), cfg.action_dim)).astype(np.float32),
        "action_mask": np.ones((b, max(num_actions, 1)), bool),
        "proprio": rng.standard_normal((b, cfg.proprio_dim)).astype(np.float32),
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        built = build_stage_step(spec, mesh, rules, total_steps=1000)
        init = sharded_init(built.init_boxed, mesh, rules)
        state = init.init(jax.random.PRNGKey(0))
        step = jit_train_step(built.step_fn, init.shardings)
        batch = {k: jax.device_put(v, batch_sharding(mesh, rules, v.ndim)) for k, v in host.items()}
        t0 = time.perf_counter()
        state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics["loss"])
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(_STEPS.value):
            t0 = time.perf_counter()
            state, metrics = step(state, batch, None)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = (flops.video_tokens + flops.action_tokens) * b
    mfu = flops.train_per_step / step_s / (peak * mesh.size) if peak else None
    device = f"{jax.devices()[0].device_kind} x{mesh.size}"
    print("| size | stage | clip | batch | dtype | device | compile s | step s (median) | tokens/s | model TFLOP/s "
          "| MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {_SIZE.value} | {stage} | {config.data.num_frames}x{h}x{w} | {b} | {_DTYPE.value} | {device} | "
          f"{compile_s:.1f} | {step_s:.4f} | {tokens / step_s:,.0f} | {flops.train_per_step / step_s / 1e12:.3f} | "
          f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} |")
    assert bool(jnp.isfinite(metrics["loss"]))


if __name__ == "__main__":
    app.run(main)
