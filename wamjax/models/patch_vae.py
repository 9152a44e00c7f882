"""A pixel-space "VAE" for CPU runs: frames as patches of raw pixels, with the Wan VAE's 1 + 4k time contract.

A random Wan VAE keeps no positions (its latents are a random projection the DiT must learn to read back) and
costs more FLOPs than a small DiT. This encoder has no weights and costs nothing: latent frame 0 is clip frame 0,
latent frame k is clip frame 4k (the last frame of the k-th group of 4, the causal grouping of the Wan VAE), and
each is cut into `patch` x `patch` pixel squares stacked into channels ([H / p, W / p, 3 p^2], space-to-depth).
Decoding is exact at those frames and linear in time between them. The DiT reads it as it reads any latents, so
every run on it (training, inference, the caches, export of the DiT) is the real path with another encoder.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

NAME = re.compile(r"pixels(\d+)$")  # vae.size "pixels4": 4x4 pixel patches


@dataclasses.dataclass(frozen=True)
class PatchVAEConfig:
    """Raw pixel patches as latents; the fields consumers of a VAE config read (compression, z_dim, scale)."""

    patch: int = 4
    temporal_compression: int = 4
    in_channels: int = 3
    out_channels: int = 3
    # Pixels are in [-1, 1]; this scale gives the DiT inputs of about unit variance.
    pixel_mean: float = 0.0
    pixel_std: float = 0.5

    def __post_init__(self) -> None:
        if self.patch < 1 or self.temporal_compression < 1:
            raise ValueError(f"vae patch={self.patch}, temporal_compression={self.temporal_compression}; "
                             "expected >= 1")

    @property
    def spatial_compression(self) -> int:
        return self.patch

    @property
    def video_channels(self) -> int:
        return self.in_channels

    @property
    def z_dim(self) -> int:
        return self.in_channels * self.patch * self.patch

    @property
    def latents_mean(self) -> tuple[float, ...]:
        return (self.pixel_mean,) * self.z_dim

    @property
    def latents_std(self) -> tuple[float, ...]:
        return (self.pixel_std,) * self.z_dim

    def to_dict(self) -> dict[str, Any]:
        """A JSON description (recorded in latents caches and compared there)."""
        return {"kind": "pixel_patches", **dataclasses.asdict(self)}


def patch_config_for(size: str) -> PatchVAEConfig | None:
    """The config of a `pixels<p>` size name, or None when `size` is not one."""
    match = NAME.match(size)
    return PatchVAEConfig(patch=int(match.group(1))) if match else None


def patch_encode(cfg: PatchVAEConfig, video: jax.Array) -> jax.Array:
    """[B, 1 + 4k, H, W, 3] in [-1, 1] -> [B, 1 + k, H / p, W / p, 3 p^2]: frames 0, 4, 8, ... as pixel patches."""
    b, _, h, w, c = video.shape
    p = cfg.patch
    frames = video[:, :: cfg.temporal_compression]
    x = frames.reshape(b, frames.shape[1], h // p, p, w // p, p, c)
    return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, frames.shape[1], h // p, w // p, p * p * c)


def patch_decode(cfg: PatchVAEConfig, latents: jax.Array) -> jax.Array:
    """Inverse of `patch_encode` at the kept frames, linear in time between them: [B, 1 + 4(T' - 1), H, W, 3]."""
    b, t, hp, wp, _ = latents.shape
    p, c, tc = cfg.patch, cfg.out_channels, cfg.temporal_compression
    frames = latents.reshape(b, t, hp, wp, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, hp * p, wp * p, c)
    if t > 1:
        # Frame 4(k - 1) + j (j = 1..4) between latent frames k - 1 and k.
        weights = jnp.arange(1, tc + 1, dtype=frames.dtype) / tc
        before, after = frames[:, :-1, None], frames[:, 1:, None]
        w = weights[None, None, :, None, None, None]
        between = (before * (1 - w) + after * w).reshape(b, (t - 1) * tc, hp * p, wp * p, c)
        frames = jnp.concatenate([frames[:, :1], between], axis=1)
    return jnp.clip(frames, -1.0, 1.0)
