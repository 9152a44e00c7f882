"""Compile time of the train-step gradient vs depth, scanned vs unrolled blocks.

  python benchmarks/compile_time.py                      # CPU-sized widths, 2 / 10 / 40 layers

With `model.scan_layers=True` one block body is compiled whatever the depth, so 40 layers compile in
about the time of 2; unrolled blocks compile in time growing with depth.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from wamjax.models import wam
from wamjax.models.config import SIZES, ModelConfig

_SIZE = flags.DEFINE_string("size", "small", "Width preset (layers are overridden).")
_LAYERS = flags.DEFINE_list("layers", ["2", "10", "40"], "Depths to compile.")


def compile_seconds(cfg: ModelConfig) -> float:
    latent, text_len, actions = (3, 4, 4, cfg.in_channels), 8, 8
    params = jax.eval_shape(lambda: wam.init_params(cfg, jax.random.key(0), latent, text_len, actions))
    inputs = wam.example_inputs(cfg, latent, text_len, actions, batch=2)

    def loss(p, x):
        out = wam.wam_forward(cfg, p, **x)
        return jnp.mean(out.video**2) + jnp.mean(out.actions**2)

    lowered = jax.jit(jax.grad(loss)).lower(params, inputs)
    t0 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0


def main(argv) -> None:
    del argv
    base = ModelConfig.from_dict(SIZES[_SIZE.value])
    print("| size | layers | scanned compile s | unrolled compile s | device |")
    print("|---|---|---|---|---|")
    for layers in (int(n) for n in _LAYERS.value):
        scanned = compile_seconds(dataclasses.replace(base, num_layers=layers, scan_layers=True))
        unrolled = compile_seconds(dataclasses.replace(base, num_layers=layers, scan_layers=False))
        print(f"| {_SIZE.value} | {layers} | {scanned:.1f} | {unrolled:.1f} | {jax.devices()[0].device_kind} |")


if __name__ == "__main__":
    app.run(main)
