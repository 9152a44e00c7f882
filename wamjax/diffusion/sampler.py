"""Euler ODE sampler with classifier-free guidance for the world-action model.

Generates future latent frames and an action chunk given clean context latent frames (held at t=0). The
few-step knobs that make a WAM fast enough for control are options, not forks: the number of video steps,
a smaller number of action steps (actions then finish early and are held clean at t=0 while the video
keeps denoising), CFG on/off, and CFG batched with the conditional pass or run sequentially.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wamjax.diffusion import flow
from wamjax.models.config import ModelConfig
from wamjax.models.wam import i2v_model_input, wam_forward

Params = Any


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How to integrate the flow ODE from noise (t=1) to data (t=0).

    num_steps: Euler steps of the video. action_steps: Euler steps of the actions (None = num_steps); when
    smaller, actions reach t=0 first and stay there. cfg_scale: guidance weight (1.0 = no guidance, one
    forward per step). cfg_batched: conditional and null-text passes share one forward on a doubled batch;
    False runs them one after the other (less memory). shift: Wan's timestep shift of the schedule.
    """

    num_steps: int = 4
    action_steps: int | None = None
    cfg_scale: float = 1.0
    cfg_batched: bool = True
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps}; expected >= 1")
        if self.action_steps is not None and self.action_steps < 1:
            raise ValueError(f"action_steps={self.action_steps}; expected >= 1 or None")

    @property
    def resolved_action_steps(self) -> int:
        return self.num_steps if self.action_steps is None else self.action_steps

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def num_iterations(self) -> int:
        return max(self.num_steps, self.resolved_action_steps)


class SampleOutput(NamedTuple):
    """Denoised latents [B, F, H, W, C] (context frames included, unchanged) and actions [B, T_a, A]."""

    latents: jax.Array
    actions: jax.Array | None


def step_times(num_steps: int, num_iterations: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(t, t_next) per iteration for a modality with `num_steps` steps, held at 0 once its steps are done."""
    # The numpy twin of flow.sampling_schedule: this runs while tracing, where it must stay a constant.
    schedule = flow.shift_time(np.linspace(1.0, 0.0, num_steps + 1), shift).astype(np.float32)
    schedule = np.concatenate([schedule, np.zeros(num_iterations - num_steps, np.float32)])
    return schedule[:-1], schedule[1:]


def guided(
    velocity_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array | None]],
    text: jax.Array,
    options: SamplerOptions,
) -> tuple[jax.Array, jax.Array | None]:
    """Velocities with classifier-free guidance; `velocity_fn(text)` runs the model for one text batch.

    The null condition is the all-zeros text embedding, as the trainer drops text.
    """
    if not options.uses_cfg:
        return velocity_fn(text)
    null = jnp.zeros_like(text)
    if options.cfg_batched:
        both = velocity_fn(jnp.concatenate([text, null], axis=0))
        b = text.shape[0]
        cond = jax.tree.map(lambda x: x[:b], both)
        uncond = jax.tree.map(lambda x: x[b:], both)
    else:
        cond, uncond = velocity_fn(text), velocity_fn(null)
    s = options.cfg_scale
    return jax.tree.map(lambda c, u: u + s * (c - u), cond, uncond)


def _double(x: jax.Array | None) -> jax.Array | None:
    return None if x is None else jnp.concatenate([x, x], axis=0)


@functools.partial(jax.jit, static_argnames=("cfg", "options", "stop_after_actions", "freeze_actions"))
def sample(
    cfg: ModelConfig,
    params: Params,
    context_latents: jax.Array,
    text: jax.Array,
    proprio: jax.Array | None,
    video_noise: jax.Array | None,
    action_noise: jax.Array | None,
    *,
    options: SamplerOptions,
    stop_after_actions: bool = False,
    clean_future: jax.Array | None = None,
    clean_actions: jax.Array | None = None,
    freeze_actions: bool = False,
    image_conditioning: tuple[jax.Array, jax.Array] | None = None,
) -> SampleOutput:
    """Samples future latents and actions by Euler integration of the model's velocity.

    context_latents [B, Fc, H, W, C] are clean; video_noise [B, F - Fc, H, W, C] and action_noise
    [B, T_a, A] (None: video only) are the starting points at t=1. With `stop_after_actions`, integration ends
    once the actions are clean: the returned future latents are then only partly denoised (for callers that
    want the action chunk alone, fastest when action_steps < num_steps).

    One modality can be held instead of denoised (see wamjax.diffusion.modes): `clean_future`
    [B, F - Fc, H, W, C] holds the future video clean at t=0 (inverse dynamics; video_noise is then unused
    and may be None), `clean_actions` [B, T_a, A] holds the actions clean at t=0 (world model; action_noise
    unused), `freeze_actions` keeps the actions at their noise, t=1, carrying no information (the video pass
    of imagine-then-act). Image-conditioned (I2V) models take
    `image_conditioning` = (condition latents [B, F, H, W, z], CLIP tokens [B, tokens, image_dim]), as the
    trainer builds them; both passes of guidance read them, as in Wan's I2V pipeline.
    """
    if clean_actions is not None and freeze_actions:
        raise ValueError("clean_actions and freeze_actions both given; hold the actions one way")
    if clean_future is not None:
        video_noise = clean_future
    if clean_actions is not None:
        action_noise = clean_actions
    if video_noise is None:
        raise ValueError("video_noise is None; it is needed unless clean_future is given")
    batch, num_context = context_latents.shape[:2]
    if video_noise.shape[0] != batch or video_noise.shape[2:] != context_latents.shape[2:]:
        raise ValueError(
            f"video_noise has shape {video_noise.shape}; expected [{batch}, F_future, "
            f"{', '.join(map(str, context_latents.shape[2:]))}] to follow context_latents {context_latents.shape}"
        )
    num_frames = num_context + video_noise.shape[1]
    if clean_future is not None:  # every frame is held clean, like the context
        num_context = num_frames
    context_mask = jnp.arange(num_frames) < num_context
    iterations = options.num_iterations
    if stop_after_actions and action_noise is not None:
        iterations = options.resolved_action_steps
    tv, tv_next = step_times(options.num_steps, options.num_iterations, options.shift)
    ta, ta_next = step_times(options.resolved_action_steps, options.num_iterations, options.shift)
    if clean_future is not None:  # only the actions move
        iterations = options.resolved_action_steps
    if clean_actions is not None or freeze_actions:  # only the video moves
        iterations = options.num_steps
        ta = ta_next = np.full_like(ta, 0.0 if clean_actions is not None else 1.0)
    xs = tuple(jnp.asarray(a[:iterations]) for a in (tv, tv_next, ta, ta_next))

    def velocity(video: jax.Array, actions: jax.Array | None, t_v: jax.Array, t_a: jax.Array):
        t_frames = jnp.where(context_mask, 0.0, t_v)[None].repeat(batch, 0)
        t_actions = None if actions is None else jnp.full((batch,), t_a)

        def run(text_batch: jax.Array):
            reps = text_batch.shape[0] // batch
            lat, act, tf, tact, prop = video, actions, t_frames, t_actions, proprio
            condition, image = image_conditioning or (None, None)
            if reps == 2:
                lat, act, tf, tact, prop, condition, image = (
                    _double(x) for x in (lat, act, tf, tact, prop, condition, image)
                )
            if condition is not None:
                lat = i2v_model_input(lat, condition)
            out = wam_forward(
                cfg, params, lat, flow.to_model_timestep(tf), text_batch, act,
                None if tact is None else flow.to_model_timestep(tact), prop, image,
            )
            return out.video, out.actions

        return guided(run, text, options)

    def body(carry, times):
        video, actions = carry
        t_v, t_v_next, t_a, t_a_next = times
        v_video, v_actions = velocity(video, actions, t_v, t_a)
        future = video + (t_v_next - t_v) * v_video
        video = jnp.where(context_mask.reshape(1, -1, *([1] * (video.ndim - 2))), video, future)
        if actions is not None:
            actions = actions + (t_a_next - t_a) * v_actions
        return (video, actions), None

    video0 = jnp.concatenate([context_latents.astype(jnp.float32), video_noise.astype(jnp.float32)], axis=1)
    actions0 = None if action_noise is None else action_noise.astype(jnp.float32)
    (video, actions), _ = jax.lax.scan(body, (video0, actions0), xs)
    return SampleOutput(video, actions)
