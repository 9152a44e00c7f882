"""The frozen encoders run on training and inference inputs: VAE latents of clips (one or several camera views)
and CLIP tokens of first frames, with Wan2.1-I2V's conditioning built from both."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from wamjax.models import clip
from wamjax.models import vae as vae_lib
from wamjax.models.token_layout import views_into_batch, views_out_of_batch
from wamjax.models.wam import first_frame_video

Params = Any


def encode_views(vae_config: Any, vae_params: Params, video: jax.Array) -> jax.Array:
    """VAE latents of video [B, T, H, W, 3] -> [B, F, h, w, z], or of several camera views [B, T, V, H, W, 3] ->
    [B, F, V, h, w, z]: each view encoded on its own, all views in one VAE batch."""
    if video.ndim == 5:
        return vae_lib.vae_encode(vae_config, vae_params, video)
    views = video.shape[2]
    return views_out_of_batch(vae_lib.vae_encode(vae_config, vae_params, views_into_batch(video)), views)


def frames_to_latents(vae_config: Any, vae_params: Params, frames: jax.Array) -> jax.Array:
    """uint8 frames [B, T, H, W, 3] (or [B, T, V, H, W, 3]) -> normalized VAE latents [B, 1+(T-1)/4, H/8, W/8, z]
    (or [B, F, V, h, w, z]), no gradients."""
    latents = encode_views(vae_config, vae_params, vae_lib.frames_to_video(frames))
    return jax.lax.stop_gradient(vae_lib.normalize_latents(vae_config, latents))


def encode_first_frames(image_encoder: clip.CLIPVisionConfig, params: Params, first_frames: jax.Array) -> jax.Array:
    """CLIP tokens of first frames [B, H, W, 3] -> [B, N, image_dim]; several views [B, V, H, W, 3] are encoded
    one by one and their tokens concatenated, view by view -> [B, V * N, image_dim]."""
    if first_frames.ndim == 4:
        return clip.encode_frames(image_encoder, params, first_frames)
    b, v = first_frames.shape[:2]
    tokens = clip.encode_frames(image_encoder, params, first_frames.reshape(b * v, *first_frames.shape[2:]))
    return tokens.reshape(b, v * tokens.shape[1], tokens.shape[2])


def i2v_latents_and_conditioning(
    vae_config: Any, image_encoder: clip.CLIPVisionConfig, vae_params: Params, image_encoder_params: Params,
    frames: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Wan2.1-I2V inputs of uint8 clips [B, T, H, W, 3], frozen: the clips' normalized latents, and as
    conditioning the normalized latents of the first frame followed by zero frames and the first frame's CLIP
    tokens. Clips and conditioning videos go through the VAE as one batch (one encoder in the compiled step).
    Several views [B, T, V, H, W, 3] are each conditioned on their own first frame; their CLIP tokens are
    concatenated view by view."""
    video = vae_lib.frames_to_video(frames)
    both = encode_views(vae_config, vae_params, jnp.concatenate([video, first_frame_video(video)], axis=0))
    both = jax.lax.stop_gradient(vae_lib.normalize_latents(vae_config, both))
    x0, condition = jnp.split(both, 2, axis=0)
    image = encode_first_frames(image_encoder, image_encoder_params, frames[:, 0])
    return x0, {"condition_latents": condition, "image_embeddings": image}
