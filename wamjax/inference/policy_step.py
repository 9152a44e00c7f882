"""The pure functions a policy jits: context frames -> VAE latents -> sampled video and actions, the imagine-then-act
sampler, and the VAE decode of predicted latents; `PolicyShapes` holds what one compiled call depends on."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from wamjax.diffusion.sampler import SampleOutput, SamplerOptions, sample
from wamjax.inference import conditioning
from wamjax.models import vae as vae_lib
from wamjax.models.config import ModelConfig
from wamjax.models.encoders import encode_views
from wamjax.models.token_layout import views_into_batch, views_out_of_batch

Params = Any


@dataclasses.dataclass(frozen=True)
class PolicyShapes:
    """Static facts one compiled policy step depends on."""

    model: ModelConfig
    vae: Any
    options: SamplerOptions
    future_frames: int
    num_actions: int
    stop_after_actions: bool
    mode: str = "joint"  # a wamjax.diffusion.modes.MODES entry
    image_encoder: Any = None  # CLIPVisionConfig of an image-conditioned (I2V) model
    num_frames: int = 0  # pixel frames of a training clip (the I2V conditioning video's length)



def encode_context(shapes: PolicyShapes, vae_params: Params, frames: jax.Array, image_params: Params
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Normalized VAE latents of uint8 context frames, and an I2V model's (condition latents, CLIP tokens)."""
    image_conditioning = None
    if shapes.image_encoder is not None:
        image_conditioning = conditioning.i2v_conditioning(
            shapes.vae, vae_params, shapes.image_encoder, image_params, frames[:, 0], shapes.num_frames
        )
    video = vae_lib.frames_to_video(frames)
    latents = vae_lib.normalize_latents(shapes.vae, encode_views(shapes.vae, vae_params, video))
    return latents, image_conditioning


def decode_latents(vae_config: Any, vae_params: Params, latents: jax.Array) -> jax.Array:
    """Normalized latents [B, F, H', W', C] (or [B, F, V, H', W', C], each view decoded on its own) -> frames in
    [-1, 1]."""
    denormalized = vae_lib.denormalize_latents(vae_config, latents)
    if denormalized.ndim == 6:  # [B, T, V, H, W, 3]
        views = denormalized.shape[2]
        return views_out_of_batch(vae_lib.vae_decode(vae_config, vae_params, views_into_batch(denormalized)), views)
    return vae_lib.vae_decode(vae_config, vae_params, denormalized)


def policy_step(shapes: PolicyShapes, params: Params, vae_params: Params, frames: jax.Array, text: jax.Array,
                proprio: jax.Array, rng: jax.Array, image_params: Params = None) -> Any:
    """The pure function a policy jits: uint8 context frames -> VAE latents -> sampled video and actions."""
    latents, image_conditioning = encode_context(shapes, vae_params, frames, image_params)
    return sample_from_latents(shapes, params, latents, image_conditioning, text, proprio, rng)


def sample_from_latents(shapes: PolicyShapes, params: Params, latents: jax.Array,
                        image_conditioning: tuple[jax.Array, jax.Array] | None, text: jax.Array, proprio: jax.Array,
                        rng: jax.Array, action_prefix: jax.Array | None = None) -> Any:
    """The sampling half of `policy_step`: normalized context latents -> sampled video and actions (the first
    actions held clean at `action_prefix` [B, k, A], joint mode only)."""
    rng_v, rng_a = jax.random.split(rng)
    b = latents.shape[0]
    video_noise = jax.random.normal(rng_v, (b, shapes.future_frames, *latents.shape[2:]), jnp.float32)
    action_noise = jax.random.normal(rng_a, (b, shapes.num_actions, shapes.model.action_dim), jnp.float32)
    if action_prefix is not None and shapes.mode != "joint":
        raise ValueError(f"action_prefix is supported in mode 'joint'; this call's mode is {shapes.mode!r}")
    if shapes.mode == "imagine_then_act":
        return imagine_then_act(shapes.model, params, latents, text, proprio, video_noise, action_noise,
                                shapes.options, image_conditioning=image_conditioning)
    return sample(
        shapes.model, params, latents, text, proprio, video_noise, action_noise,
        options=shapes.options, stop_after_actions=shapes.stop_after_actions,
        image_conditioning=image_conditioning, action_prefix=action_prefix,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "options"))
def imagine_then_act(
    cfg: ModelConfig, params: Params, context_latents: jax.Array, text: jax.Array, proprio: jax.Array | None,
    video_noise: jax.Array, action_noise: jax.Array, options: SamplerOptions,
    image_conditioning: tuple[jax.Array, jax.Array] | None = None,
) -> SampleOutput:
    """Inverse dynamics on imagined video: the future video is generated with the actions held at noise, then
    the actions are denoised from the same noise with that video held clean. Returns both."""
    video = sample(cfg, params, context_latents, text, proprio, video_noise, action_noise, options=options,
                   freeze_actions=True, image_conditioning=image_conditioning).latents
    num_context = context_latents.shape[1]
    actions = sample(cfg, params, context_latents, text, proprio, None, action_noise, options=options,
                     clean_future=video[:, num_context:], image_conditioning=image_conditioning).actions
    return SampleOutput(video, actions)
