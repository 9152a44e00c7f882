"""VAE encode time per clip (batch 1) for the tiny and the full Wan 2.1 VAE, on the default JAX backend.

    python benchmarks/vae_encode.py [--sizes=tiny,wan2.1] [--clips=9x64x64,33x240x416] [--repeats=3]

Random weights (timing does not depend on them). A clip whose time, extrapolated from the smallest clip of
the same VAE by voxel count, would exceed --max_seconds is skipped and reported as such.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from wamjax.models.vae import init_vae_params, latent_shape, vae_config_for, vae_encode


def parse_clip(text: str) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in text.lower().split("x"))
    return t, h, w


def time_encode(size: str, clip: tuple[int, int, int], repeats: int) -> tuple[float, float]:
    """(compile + first run seconds, median seconds per clip over `repeats` runs)."""
    config = vae_config_for(size)
    params = init_vae_params(config, jax.random.key(0))
    video = jax.random.uniform(jax.random.key(1), (1, *clip, 3), minval=-1.0, maxval=1.0)
    start = time.perf_counter()
    vae_encode(config, params, video).block_until_ready()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vae_encode(config, params, video).block_until_ready()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,wan2.1")
    parser.add_argument("--clips", default="9x32x32,9x64x64,33x240x416")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_seconds", type=float, default=60.0)
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"backend: {jax.default_backend()}  device: {device.device_kind}  jax {jax.__version__}")
    print(f"{'vae':<8} {'clip TxHxW':<12} {'latents':<16} {'first call s':>12} {'s / clip':>10}")
    clips = sorted((parse_clip(c) for c in args.clips.split(",")), key=lambda c: c[0] * c[1] * c[2])
    for size in args.sizes.split(","):
        config = vae_config_for(size)
        reference: tuple[float, int] | None = None
        for clip in clips:
            name = "x".join(map(str, clip))
            voxels = clip[0] * clip[1] * clip[2]
            latents = "x".join(map(str, latent_shape(config, (1, *clip))[1:]))
            if reference is not None:
                estimate = reference[0] * voxels / reference[1]
                if estimate > args.max_seconds:
                    print(f"{size:<8} {name:<12} {latents:<16} {'skipped':>12} {f'~{estimate:.0f}?':>10}")
                    continue
            first, per_clip = time_encode(size, clip, args.repeats)
            reference = reference or (per_clip, voxels)
            print(f"{size:<8} {name:<12} {latents:<16} {first:>12.2f} {per_clip:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
