"""Euler ODE sampler with classifier-free guidance for the world-action model.

Generates future latent frames and an action chunk given clean context latent frames (held at t=0). The
few-step knobs that make a WAM fast enough for control are options, not forks: the number of video steps,
a smaller number of action steps (actions then finish early and are held clean at t=0 while the video
keeps denoising), CFG on/off, and CFG batched with the conditional pass or run sequentially. The real-time
knobs too: a decoupled schedule where the video stops at a noise level above 0 (DreamZero-Flash), DiT step
caching (a step reuses the last velocity, by a fixed mask or when successive velocities barely change), CFG
parallelism (the conditional and null-text halves of the batch on devices of their own) and a per-step clock
for latency breakdowns (`StepClock`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
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

    video_stop_t: the noise level the video's schedule ends at (0 = fully denoised); DreamZero-Flash stops the
    video early, at a high noise level, while the actions denoise fully (with action_steps=1: one forward).
    step_cache_mask: one entry per iteration (`num_iterations`), False = skip the model and reuse the last
    velocity (the first entry must be True). step_cache_threshold: skip an iteration when the cosine similarity
    of the last two velocities exceeds it (never twice in a row; 1.0 never skips). cfg_parallel: 2 puts the
    conditional and null-text halves of a batched CFG forward on two devices (`jax.devices()[:2]`), combined
    once per step; traced under a mesh (`jax.set_mesh`, as `compile_check` does for a topology), the halves go to
    the mesh's batch axes (`mesh.data=2`: two device groups, each with the weights sharded over its own devices).
    time_steps: each iteration reports to `STEP_CLOCK` when it is done (latency breakdowns).
    """

    num_steps: int = 4
    action_steps: int | None = None
    cfg_scale: float = 1.0
    cfg_batched: bool = True
    shift: float = 1.0
    video_stop_t: float = 0.0
    step_cache_mask: tuple[bool, ...] | None = None
    step_cache_threshold: float | None = None
    cfg_parallel: int = 1
    time_steps: bool = False

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps}; expected >= 1")
        if self.action_steps is not None and self.action_steps < 1:
            raise ValueError(f"action_steps={self.action_steps}; expected >= 1 or None")
        if not 0.0 <= self.video_stop_t < 1.0:
            raise ValueError(f"video_stop_t={self.video_stop_t}; expected a noise level in [0, 1)")
        if self.step_cache_mask is not None:
            mask = tuple(bool(m) for m in self.step_cache_mask)
            object.__setattr__(self, "step_cache_mask", mask)
            if len(mask) != self.num_iterations:
                raise ValueError(
                    f"step_cache_mask has {len(mask)} entries; expected {self.num_iterations}, one per denoising "
                    f"iteration (max of num_steps={self.num_steps} and action_steps={self.resolved_action_steps})"
                )
            if not mask[0]:
                raise ValueError("step_cache_mask[0] is False; the first iteration has no velocity to reuse")
        if self.step_cache_threshold is not None:
            if self.step_cache_mask is not None:
                raise ValueError("step_cache_mask and step_cache_threshold both given; cache steps one way")
            if not -1.0 <= self.step_cache_threshold <= 1.0:
                raise ValueError(f"step_cache_threshold={self.step_cache_threshold}; expected a cosine similarity "
                                 "in [-1, 1] (1.0 never skips)")
        if self.cfg_parallel != 1:
            mesh = jax.sharding.get_abstract_mesh()
            devices = len(jax.devices()) if mesh.empty else mesh.size  # a compile for a topology sets a mesh
            if self.cfg_parallel < 1 or devices % self.cfg_parallel:
                raise ValueError(f"inference.cfg_parallel={self.cfg_parallel} does not divide the {devices} devices")
            if self.cfg_parallel != 2:
                raise ValueError(f"inference.cfg_parallel={self.cfg_parallel}; expected 1 or 2 (one device per CFG "
                                 "branch: conditional and null-text)")
        if self.cfg_parallel == 2 and not (self.uses_cfg and self.cfg_batched):
            raise ValueError(f"inference.cfg_parallel=2 splits a batched CFG forward; it needs cfg_scale != 1 (got "
                             f"{self.cfg_scale}) and cfg_batched=True (got {self.cfg_batched})")

    @property
    def resolved_action_steps(self) -> int:
        return self.num_steps if self.action_steps is None else self.action_steps

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def num_iterations(self) -> int:
        return max(self.num_steps, self.resolved_action_steps)

    @property
    def caches_steps(self) -> bool:
        return self.step_cache_mask is not None or self.step_cache_threshold is not None


class StepClock:
    """Host times at which each denoising iteration of a `time_steps=True` sampler finished.

    `start()` before calling a sampler, `stop()` after its result is ready: [(iteration, skipped, seconds)] in
    `time.perf_counter` seconds, one entry per iteration run (the latest report when several devices report it).
    The device reports from threads of its own, so the clock is one per process: time one call at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ticks: list[tuple[int, bool, float]] | None = None

    def start(self) -> None:
        with self._lock:
            self._ticks = []

    def tick(self, iteration: Any, skipped: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            if self._ticks is not None:
                self._ticks.append((int(iteration), bool(skipped), now))

    def stop(self) -> list[tuple[int, bool, float]]:
        with self._lock:
            ticks, self._ticks = self._ticks or [], None
        merged: list[tuple[int, bool, float]] = []
        for entry in ticks:  # several devices report the same iteration one after the other
            if merged and merged[-1][0] == entry[0]:
                merged[-1] = max(merged[-1], entry, key=lambda e: e[2])
            else:
                merged.append(entry)
        return merged


STEP_CLOCK = StepClock()


def tick(options: SamplerOptions, iteration: jax.Array, skipped: jax.Array, after: Any) -> None:
    """Reports iteration `iteration` done to `STEP_CLOCK` once `after` (a pytree of its outputs) is computed."""
    if not options.time_steps:
        return
    leaf = jax.tree.leaves(after)[0]
    # A single element depends on the whole forward (attention mixes every token): the report waits for it.
    done = jnp.ravel(leaf)[0]
    # Unordered: an ordered effect would refuse inputs placed on several devices; the data dependency on `done`
    # already holds the report back until the iteration is computed.
    jax.debug.callback(lambda i, s, _: STEP_CLOCK.tick(i, s), iteration, skipped, done)


class VelocityCache(NamedTuple):
    """What DiT step caching carries between iterations."""

    last: Any  # the velocities of the previous iteration (a pytree)
    similarity: jax.Array  # float32 []: cosine similarity of the last two velocities (-1: compute the next one)


def start_velocity_cache(velocities_like: Any) -> VelocityCache:
    return VelocityCache(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), velocities_like),
                         jnp.asarray(-1.0, jnp.float32))


def _cosine(a: Any, b: Any) -> jax.Array:
    dot = sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    na = sum(jnp.sum(x * x) for x in jax.tree.leaves(a))
    nb = sum(jnp.sum(y * y) for y in jax.tree.leaves(b))
    return jnp.clip(dot / jnp.sqrt(jnp.maximum(na * nb, 1e-30)), -1.0, 1.0)


def cached_velocity(
    options: SamplerOptions, iteration: jax.Array, compute: Callable[[], Any], cache: VelocityCache,
) -> tuple[Any, VelocityCache, jax.Array]:
    """(velocities, cache, skipped) of one iteration: `compute()` runs the model unless the step cache says to
    reuse the last velocities (see SamplerOptions.step_cache_mask / step_cache_threshold)."""
    if not options.caches_steps:
        return compute(), cache, jnp.asarray(False)
    if options.step_cache_mask is not None:
        skip = ~jnp.asarray(options.step_cache_mask)[iteration]
    else:
        skip = (cache.similarity > options.step_cache_threshold) & (iteration >= 2)
    velocities = jax.lax.cond(skip, lambda: cache.last, lambda: jax.tree.map(lambda v: v.astype(jnp.float32),
                                                                             compute()))
    similarity = jnp.where(skip | (iteration == 0), -1.0, _cosine(velocities, cache.last))
    return velocities, VelocityCache(velocities, similarity.astype(jnp.float32)), skip


def cfg_sharded(options: SamplerOptions, x: Any, axis: int = 0) -> Any:
    """With cfg_parallel=2, `x` (a doubled CFG batch: conditional half, then null-text half, along `axis`)
    constrained to put each half on its own device; else `x` as it is."""
    if options.cfg_parallel == 1 or x is None:
        return x
    ambient = jax.sharding.get_abstract_mesh()
    if not ambient.empty:
        return _cfg_over_batch_axes(options, ambient, x, axis)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[: options.cfg_parallel]), ("cfg",))

    def constrain(a: jax.Array) -> jax.Array:
        spec = [None] * a.ndim
        spec[axis] = "cfg"
        return jax.lax.with_sharding_constraint(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    return jax.tree.map(constrain, x)


def _cfg_over_batch_axes(options: SamplerOptions, mesh: Any, x: Any, axis: int) -> Any:
    """`cfg_sharded` under a mesh: the doubled batch over the axes the logical `batch` rule names, which must
    hold exactly `cfg_parallel` devices (one group per CFG branch)."""
    axes = nn.logical_to_mesh_axes(("batch",), nn.get_logical_axis_rules())[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(int(mesh.shape[a]) for a in axes)
    if size != options.cfg_parallel:
        raise ValueError(f"inference.cfg_parallel={options.cfg_parallel} under a mesh whose batch axes {axes} hold "
                         f"{size} devices; give the CFG pair {options.cfg_parallel} groups (e.g. mesh.data="
                         f"{options.cfg_parallel}, mesh.fsdp=1, mesh.tensor=-1)")

    def constrain(a: jax.Array) -> jax.Array:
        spec = [None] * a.ndim
        spec[axis] = axes
        return jax.lax.with_sharding_constraint(a, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map(constrain, x)


class SampleOutput(NamedTuple):
    """Denoised latents [B, F, H, W, C] (context frames included, unchanged) and actions [B, T_a, A]."""

    latents: jax.Array
    actions: jax.Array | None


def step_times(num_steps: int, num_iterations: int, shift: float,
               stop_t: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(t, t_next) per iteration for a modality with `num_steps` steps from t=1 to `stop_t`, held at `stop_t`
    once its steps are done."""
    # The numpy twin of flow.sampling_schedule: this runs while tracing, where it must stay a constant.
    schedule = flow.shift_time(np.linspace(1.0, 0.0, num_steps + 1), shift)
    schedule = (stop_t + (1.0 - stop_t) * schedule).astype(np.float32)  # [1, stop_t], the shifted spacing kept
    schedule = np.concatenate([schedule, np.full(num_iterations - num_steps, schedule[-1], np.float32)])
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
        both = velocity_fn(cfg_sharded(options, jnp.concatenate([text, null], axis=0)))
        b = text.shape[0]
        cond = jax.tree.map(lambda x: x[:b], both)
        uncond = jax.tree.map(lambda x: x[b:], both)
    else:
        cond, uncond = velocity_fn(text), velocity_fn(null)
    s = options.cfg_scale
    return jax.tree.map(lambda c, u: u + s * (c - u), cond, uncond)


def _double(x: jax.Array | None) -> jax.Array | None:
    return None if x is None else jnp.concatenate([x, x], axis=0)


def check_action_prefix(action_prefix: Any, num_actions: int, action_dim: int) -> None:
    """Refuses an action prefix [B, k, A] (or [k, A]) longer than the chunk's `num_actions` or of another width."""
    shape = tuple(action_prefix.shape)
    if len(shape) not in (2, 3) or shape[-1] != action_dim:
        raise ValueError(f"action_prefix has shape {shape}; expected [k, {action_dim}] (k actions already chosen)")
    if shape[-2] > num_actions:
        raise ValueError(f"action_prefix holds {shape[-2]} actions; the chunk has {num_actions}: a clean prefix "
                         "cannot be longer than the chunk")


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
    action_prefix: jax.Array | None = None,
) -> SampleOutput:
    """Samples future latents and actions by Euler integration of the model's velocity.

    `action_prefix` [B, k, A] (k <= T_a) holds the chunk's first k actions clean at t=0 while the rest are
    denoised around them (inference-time inpainting for real-time chunking: the actions that execute while
    this chunk is computed are already chosen); they are returned unchanged.

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
    joint = clean_future is None and clean_actions is None and not freeze_actions
    tv, tv_next = step_times(options.num_steps, options.num_iterations, options.shift,
                             options.video_stop_t if joint else 0.0)
    ta, ta_next = step_times(options.resolved_action_steps, options.num_iterations, options.shift)
    if clean_future is not None:  # only the actions move
        iterations = options.resolved_action_steps
    if clean_actions is not None or freeze_actions:  # only the video moves
        iterations = options.num_steps
        ta = ta_next = np.full_like(ta, 0.0 if clean_actions is not None else 1.0)
    prefix_mask = None
    if action_prefix is not None:
        if action_noise is None or clean_actions is not None or freeze_actions:
            raise ValueError("action_prefix needs actions that are denoised (action_noise, no clean/frozen actions)")
        check_action_prefix(action_prefix, action_noise.shape[1], action_noise.shape[2])
        k = action_prefix.shape[1]
        prefix_mask = (jnp.arange(action_noise.shape[1]) < k)[None, :, None]
        padded = jnp.zeros(action_noise.shape, jnp.float32).at[:, :k].set(action_prefix.astype(jnp.float32))
        action_noise = jnp.where(prefix_mask, padded, action_noise.astype(jnp.float32))
    xs = (jnp.arange(iterations), *(jnp.asarray(a[:iterations]) for a in (tv, tv_next, ta, ta_next)))

    def velocity(video: jax.Array, actions: jax.Array | None, t_v: jax.Array, t_a: jax.Array):
        t_frames = jnp.where(context_mask, 0.0, t_v)[None].repeat(batch, 0)
        t_actions = None if actions is None else jnp.full((batch,), t_a)
        if prefix_mask is not None:  # the prefix tokens read the clean timestep
            t_actions = jnp.where(prefix_mask[..., 0], 0.0, t_a) * jnp.ones((batch, 1))

        def run(text_batch: jax.Array):
            reps = text_batch.shape[0] // batch
            lat, act, tf, tact, prop = video, actions, t_frames, t_actions, proprio
            condition, image = image_conditioning or (None, None)
            if reps == 2:
                lat, act, tf, tact, prop, condition, image = (
                    cfg_sharded(options, _double(x)) for x in (lat, act, tf, tact, prop, condition, image)
                )
            if condition is not None:
                lat = i2v_model_input(lat, condition)
            out = wam_forward(
                cfg, params, lat, flow.to_model_timestep(tf), text_batch, actions=act,
                t_action=None if tact is None else flow.to_model_timestep(tact), proprio=prop, image_embeddings=image,
            )
            return out.video, out.actions

        return guided(run, text, options)

    def body(carry, times):
        video, actions, cache = carry
        i, t_v, t_v_next, t_a, t_a_next = times
        (v_video, v_actions), cache, skipped = cached_velocity(
            options, i, lambda: velocity(video, actions, t_v, t_a), cache)
        future = video + (t_v_next - t_v) * v_video
        video = jnp.where(context_mask.reshape(1, -1, *([1] * (video.ndim - 2))), video, future)
        if actions is not None:
            stepped = actions + (t_a_next - t_a) * v_actions
            actions = stepped if prefix_mask is None else jnp.where(prefix_mask, actions, stepped)
        tick(options, i, skipped, (actions, video))
        return (video, actions, cache), None

    video0 = jnp.concatenate([context_latents.astype(jnp.float32), video_noise.astype(jnp.float32)], axis=1)
    actions0 = None if action_noise is None else action_noise.astype(jnp.float32)
    cache0 = start_velocity_cache((video0, actions0)) if options.caches_steps else None
    (video, actions, _), _ = jax.lax.scan(body, (video0, actions0, cache0), xs)
    return SampleOutput(video, actions)
