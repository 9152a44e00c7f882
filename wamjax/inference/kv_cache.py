"""Chunk-wise causal autoregressive generation with a per-layer KV cache, as DreamZero runs its WAM.

A chunk-causal model (model.attention_layout="chunk_causal") splits the joint sequence into chunks: chunk 0
is the context latent frame plus the proprio token; chunk k >= 1 is `chunk_latent_frames` latent frames plus
the action tokens aligned with them (and, with `ChunkGeometry.proprio_per_chunk`, its own state token: the state
its actions start from, read by that chunk's tokens while they are denoised and never cached, as in the
teacher-forced layout where only the chunk's noisy copy sees it). A token sees its own chunk and earlier ones
only, so the keys and values of a finished chunk never change: they are computed once (at t=0, clean) and
cached per layer. Generating chunk k denoises only its own tokens against the cache. When the real observation
of a chunk arrives it replaces the predicted frames in the cache, so closed-loop control never re-encodes the
history.

This is what a teacher-forced model (model.history="teacher_forcing") saw in training: the noisy chunk attends
to the clean keys/values of the earlier chunks and to itself. This module keeps only the rollout's bookkeeping
(geometry, cache offsets, the denoising loop of a chunk); the context is the model's own
`WorldActionModel.embed_context`, and each chunk runs through the model's own modules in
`wamjax.inference.cached_chunk` (tests/test_inference.py checks the rollout against the full teacher-forced
forward).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from wamjax.diffusion import flow
from wamjax.diffusion.sampler import (
    SamplerOptions,
    cached_velocity,
    cfg_sharded,
    check_action_prefix,
    start_velocity_cache,
    step_times,
    tick,
)
from wamjax.inference.cached_chunk import KVCache, chunk_forward, embed_chunk, write_chunk
from wamjax.models.config import ModelConfig
from wamjax.models.wam import WorldActionModel, i2v_condition

Params = Any


@dataclasses.dataclass(frozen=True)
class ChunkGeometry:
    """Static sizes of a chunked rollout: token grid per latent frame, chunk size and cache capacity."""

    latent_hw: tuple[int, int]  # latent height, width
    frames_per_chunk: int
    actions_per_chunk: int
    max_chunks: int  # chunks after the context chunk that the cache can hold
    with_proprio: bool = True
    views: int | None = None  # camera views per latent frame (tokens view layout): latents [B, n, V, H, W, C]
    proprio_per_chunk: bool = False  # each generated chunk also reads a state token of its own

    @staticmethod
    def for_model(cfg: ModelConfig, latent_hw: tuple[int, int], max_chunks: int, with_proprio: bool = True,
                  views: int | None = None, proprio_per_chunk: bool = False) -> ChunkGeometry:
        """The geometry a chunk-causal model implies; checks the model can represent `max_chunks` chunks."""
        if cfg.attention_layout != "chunk_causal":
            raise ValueError(
                f"model.attention_layout={cfg.attention_layout!r}; the KV cache needs 'chunk_causal'"
            )
        if cfg.patch_size[0] != 1:
            raise ValueError(f"model.patch_size={cfg.patch_size}; the KV cache needs a temporal patch of 1")
        c = max(cfg.chunk_latent_frames, 1)
        if proprio_per_chunk and not with_proprio:
            raise ValueError("proprio_per_chunk=True needs with_proprio=True")
        geometry = ChunkGeometry(tuple(latent_hw), c, c * cfg.action_frames_per_latent, max_chunks, with_proprio,
                                 views, proprio_per_chunk)
        if geometry.max_frames > cfg.rope_max_seq_len:
            raise ValueError(f"{geometry.max_frames} latent frames exceed model.rope_max_seq_len")
        if max_chunks * geometry.actions_per_chunk > cfg.max_action_tokens:
            raise ValueError(
                f"{max_chunks} chunks of {geometry.actions_per_chunk} actions exceed "
                f"model.max_action_tokens={cfg.max_action_tokens}"
            )
        return geometry

    def tokens_per_frame(self, cfg: ModelConfig) -> int:
        """Tokens of one latent frame, all its views."""
        per_view = (self.latent_hw[0] // cfg.patch_size[1]) * (self.latent_hw[1] // cfg.patch_size[2])
        return per_view * (self.views or 1)

    def latent_shape(self, frames: int, channels: int) -> tuple[int, ...]:
        """Per-example latents of `frames` latent frames: (n, H, W, C), or (n, V, H, W, C) with views."""
        views = () if self.views is None else (self.views,)
        return (frames, *views, *self.latent_hw, channels)

    def context_tokens(self, cfg: ModelConfig) -> int:
        return self.tokens_per_frame(cfg) + int(self.with_proprio)

    def chunk_tokens(self, cfg: ModelConfig) -> int:
        return self.frames_per_chunk * self.tokens_per_frame(cfg) + self.actions_per_chunk

    def capacity(self, cfg: ModelConfig) -> int:
        return self.context_tokens(cfg) + self.max_chunks * self.chunk_tokens(cfg)

    @property
    def max_frames(self) -> int:
        return 1 + self.max_chunks * self.frames_per_chunk


def empty_cache(cfg: ModelConfig, geometry: ChunkGeometry, batch: int) -> KVCache:
    """A zeroed cache for `batch` sequences."""
    shape = (cfg.num_layers, batch, geometry.capacity(cfg), cfg.num_attention_heads, cfg.attention_head_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


# --- Rollout state and the three jitted operations -------------------------------------------------------


class RolloutState(NamedTuple):
    """Everything a chunked rollout carries between calls (a pytree; batch doubled when CFG is on)."""

    cache: KVCache
    context: jax.Array  # projected text [B or 2B, L, D] (conditional first, then null)
    num_chunks: jax.Array  # int32 []: chunks after the context chunk already in the cache
    last_actions: jax.Array  # [B, actions_per_chunk, A]: the newest chunk's actions (executed in closed loop)
    # I2V models: the 20 conditioning channels (mask + first-frame latents) of every frame of the window
    # [B or 2B, max_frames, H, W, 20]; the embedded image tokens ride in `context` as (text, image).
    condition: jax.Array | None = None


def _guided_batch(options: SamplerOptions, x: jax.Array) -> jax.Array:
    return cfg_sharded(options, jnp.concatenate([x, x], axis=0)) if options.uses_cfg else x


def _combine(options: SamplerOptions, v: jax.Array, batch: int) -> jax.Array:
    if not options.uses_cfg:
        return v
    return v[batch:] + options.cfg_scale * (v[:batch] - v[batch:])


@functools.partial(jax.jit, static_argnames=("cfg", "geometry", "options"))
def start_rollout(
    cfg: ModelConfig, geometry: ChunkGeometry, options: SamplerOptions, params: Params,
    context_latents: jax.Array, text: jax.Array, proprio: jax.Array | None,
    image_conditioning: tuple[jax.Array, jax.Array] | None = None,
) -> RolloutState:
    """Caches chunk 0: the clean context latent frame [B, 1, H, W, C] and the proprio token. I2V models take
    `image_conditioning` = (condition latents [B, max_frames, H, W, z], CLIP tokens [B, tokens, image_dim])."""
    batch = context_latents.shape[0]
    if options.uses_cfg:
        text = jnp.concatenate([text, jnp.zeros_like(text)], axis=0)
    condition = image = None
    if image_conditioning is not None:
        condition_latents, image = (_guided_batch(options, x) for x in image_conditioning)
        condition = i2v_condition(condition_latents.astype(jnp.float32))
    context = WorldActionModel(cfg).apply({"params": params}, cfg_sharded(options, text), image,
                                          method=WorldActionModel.embed_context)
    lat = _with_condition(_guided_batch(options, context_latents.astype(jnp.float32)), condition, 0)
    prop = None if proprio is None else _guided_batch(options, proprio.astype(jnp.float32))
    tokens = embed_chunk(cfg, geometry.max_frames, params, lat, jnp.zeros(lat.shape[:2]), 0, proprio=prop)
    cache = empty_cache(cfg, geometry, lat.shape[0])
    # CFG parallel: each branch's device keeps the keys/values of its half of the batch.
    cache = cache._replace(keys=cfg_sharded(options, cache.keys, 1), values=cfg_sharded(options, cache.values, 1))
    out = chunk_forward(cfg, params, tokens, context, cache, geometry.latent_hw)
    cache = write_chunk(cache, out.keys, out.values, 0)
    last = jnp.zeros((batch, geometry.actions_per_chunk, cfg.action_dim), jnp.float32)
    return RolloutState(cache, context, jnp.zeros((), jnp.int32), last, condition)


def _with_condition(latents: jax.Array, condition: jax.Array | None, frame0: jax.Array | int) -> jax.Array:
    """Latents [B, n, H, W, z] with the I2V conditioning channels of frames frame0.. appended (I2V models)."""
    if condition is None:
        return latents
    part = jax.lax.dynamic_slice_in_dim(condition, frame0, latents.shape[1], axis=1)
    return jnp.concatenate([latents, part.astype(latents.dtype)], axis=-1)


def _chunk_offsets(cfg: ModelConfig, geometry: ChunkGeometry, index: jax.Array):
    """(token offset in the cache, first latent frame, first action position) of chunk `index` (1-based)."""
    token = geometry.context_tokens(cfg) + (index - 1) * geometry.chunk_tokens(cfg)
    return token, 1 + (index - 1) * geometry.frames_per_chunk, (index - 1) * geometry.actions_per_chunk


def _chunk_pass(cfg, geometry, options, params, state, index, latents, t_frames, actions, t_actions,
                proprio=None):
    """One forward of chunk `index` against the cache (batch doubled for CFG inside), with the chunk's own
    state token when `proprio` [B, P] is given."""
    offset, frame0, action0 = _chunk_offsets(cfg, geometry, index)
    prop = None if proprio is None else _guided_batch(options, proprio.astype(jnp.float32))
    tokens = embed_chunk(
        cfg, geometry.max_frames, params, _with_condition(_guided_batch(options, latents), state.condition, frame0),
        _guided_batch(options, t_frames), frame0,
        _guided_batch(options, actions), _guided_batch(options, t_actions), action0, proprio=prop,
    )
    return chunk_forward(cfg, params, tokens, state.context, state.cache, geometry.latent_hw, visible=offset)


def _commit(cfg, geometry, options, params, state, index, latents, actions) -> RolloutState:
    """Caches chunk `index` computed clean (t=0) from `latents` and `actions` (its state token, if any, is not
    cached: later chunks never read it)."""
    b, n = latents.shape[:2]
    out = _chunk_pass(cfg, geometry, options, params, state, index, latents, jnp.zeros((b, n)), actions,
                      jnp.zeros(actions.shape[:2]))
    offset, _, _ = _chunk_offsets(cfg, geometry, index)
    cache = write_chunk(state.cache, out.keys, out.values, offset)
    return state._replace(cache=cache, num_chunks=jnp.maximum(state.num_chunks, index), last_actions=actions)


def chunk_velocity(
    cfg: ModelConfig, geometry: ChunkGeometry, options: SamplerOptions, params: Params, state: RolloutState,
    index: jax.Array, video: jax.Array, actions: jax.Array, t_v: jax.Array, t_a: jax.Array,
    proprio: jax.Array | None = None, prefix_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One model evaluation of chunk `index` at flow times (t_v, t_a) against the cache: the guided velocities
    of its frames and actions (the tokens of `prefix_mask` [1, na, 1] read the clean timestep)."""
    batch = video.shape[0]
    t_frames = jnp.full(video.shape[:2], flow.to_model_timestep(t_v))
    t_actions = jnp.full(actions.shape[:2], flow.to_model_timestep(t_a))
    if prefix_mask is not None:
        t_actions = jnp.where(prefix_mask[..., 0], 0.0, t_actions)
    out = _chunk_pass(cfg, geometry, options, params, state, index, video, t_frames, actions, t_actions, proprio)
    return _combine(options, out.video, batch), _combine(options, out.actions, batch)


@functools.partial(jax.jit, static_argnames=("cfg", "geometry", "options", "mode"))
def generate_chunk(
    cfg: ModelConfig, geometry: ChunkGeometry, options: SamplerOptions, params: Params, state: RolloutState,
    video_noise: jax.Array, action_noise: jax.Array, mode: str = "joint", proprio: jax.Array | None = None,
    action_prefix: jax.Array | None = None,
) -> tuple[RolloutState, jax.Array, jax.Array]:
    """Denoises the next chunk (frames [B, n, H, W, C] and actions [B, na, A]) against the cache, reading its
    state token `proprio` [B, P] when given (`ChunkGeometry.proprio_per_chunk`), then caches the prediction
    clean. Returns (state, latents, actions). mode "imagine_then_act" denoises the frames first
    (actions held at noise, t=1), then the actions with those frames held clean (t=0); mode "world_model" takes
    `action_noise` as the chunk's given actions, held clean (t=0) while the frames are denoised.

    `action_prefix` [B, k, A] (joint mode, k <= the chunk's actions) holds the chunk's first k actions clean at
    t=0 while the rest are denoised around them (real-time chunking, as `sampler.sample` does it); they are
    returned unchanged."""
    prefix_mask = None
    if action_prefix is not None:
        if mode != "joint":
            raise ValueError(f"action_prefix is supported in mode 'joint'; this chunk's mode is {mode!r}")
        check_action_prefix(action_prefix, action_noise.shape[1], action_noise.shape[2])
        k = action_prefix.shape[1]
        prefix_mask = (jnp.arange(action_noise.shape[1]) < k)[None, :, None]
        padded = jnp.zeros(action_noise.shape, jnp.float32).at[:, :k].set(action_prefix.astype(jnp.float32))
        action_noise = jnp.where(prefix_mask, padded, action_noise.astype(jnp.float32))
    index = state.num_chunks + 1
    tv, tv_next, ta, ta_next = (jnp.asarray(a) for a in (
        *step_times(options.num_steps, options.num_iterations, options.shift),
        *step_times(options.resolved_action_steps, options.num_iterations, options.shift),
    ))

    def velocity(video, actions, t_v, t_a):
        return chunk_velocity(cfg, geometry, options, params, state, index, video, actions, t_v, t_a, proprio,
                              prefix_mask)

    def body(carry, times, caching=False):
        video, actions, cache = carry
        i, t_v, t_v_next, t_a, t_a_next = times
        if caching:  # DiT step caching (joint mode): the sampler's rule, over the chunk's velocities
            (v_video, v_actions), cache, skipped = cached_velocity(
                options, i, lambda: velocity(video, actions, t_v, t_a), cache)
        else:
            (v_video, v_actions), skipped = velocity(video, actions, t_v, t_a), jnp.asarray(False)
        video = video + (t_v_next - t_v) * v_video
        stepped = actions + (t_a_next - t_a) * v_actions
        actions = stepped if prefix_mask is None else jnp.where(prefix_mask, actions, stepped)
        tick(options, i, skipped, (actions, video))
        return (video, actions, cache), None

    init = (video_noise.astype(jnp.float32), action_noise.astype(jnp.float32), None)
    if mode == "imagine_then_act":  # a held modality has t_next == t, so its Euler step leaves it as it is
        n, m = options.num_steps, options.resolved_action_steps
        tv, tv_next = (jnp.asarray(a) for a in step_times(n, n, options.shift))
        ta, ta_next = (jnp.asarray(a) for a in step_times(m, m, options.shift))
        carry = jax.lax.scan(body, init, (jnp.arange(n), tv, tv_next, jnp.ones(n), jnp.ones(n)))[0]
        (video, actions, _), _ = jax.lax.scan(body, carry, (n + jnp.arange(m), jnp.zeros(m), jnp.zeros(m), ta,
                                                            ta_next))
    elif mode == "world_model":
        n = options.num_steps
        tv, tv_next = (jnp.asarray(a) for a in step_times(n, n, options.shift))
        (video, actions, _), _ = jax.lax.scan(body, init, (jnp.arange(n), tv, tv_next, jnp.zeros(n), jnp.zeros(n)))
    else:
        tv, tv_next = (jnp.asarray(a) for a in step_times(
            options.num_steps, options.num_iterations, options.shift, options.video_stop_t))
        if options.caches_steps:
            init = (*init[:2], start_velocity_cache(init[:2]))
        (video, actions, _), _ = jax.lax.scan(functools.partial(body, caching=options.caches_steps), init,
                                              (jnp.arange(options.num_iterations), tv, tv_next, ta, ta_next))
    state = _commit(cfg, geometry, options, params, state, index, video, actions)
    return state, video, actions


@functools.partial(jax.jit, static_argnames=("cfg", "geometry", "options"))
def observe_chunk(
    cfg: ModelConfig, geometry: ChunkGeometry, options: SamplerOptions, params: Params, state: RolloutState,
    observed_latents: jax.Array,
) -> RolloutState:
    """Teacher forcing: the newest chunk's cached keys/values are recomputed from the real observation's
    latents [B, n, H, W, C] (and the actions that were executed), replacing the predicted frames."""
    return _commit(cfg, geometry, options, params, state, state.num_chunks, observed_latents, state.last_actions)


class ChunkedRollout:
    """Host-side driver of a chunked rollout: checks shapes and capacity, holds the state between calls.

    Usage: `r = ChunkedRollout(cfg, params, geometry, options)`; `r.start(context_latents, text, proprio)`;
    then per chunk `latents, actions = r.generate(rng)`, execute the actions, `r.observe(real_latents, state)`.
    With `geometry.proprio_per_chunk` each generated chunk reads the newest state given (by `start`, then by each
    `observe`) as its own state token.
    """

    def __init__(self, cfg: ModelConfig, params: Params, geometry: ChunkGeometry, options: SamplerOptions,
                 mode: str = "joint"):
        self.cfg, self.params, self.geometry, self.options = cfg, params, geometry, options
        self.mode = mode  # "joint" | "imagine_then_act" (see generate_chunk)
        self.state: RolloutState | None = None
        self.num_chunks = 0
        self.batch = 0
        self.proprio: jax.Array | None = None  # the newest state [B, P]: the next chunk's state token

    @property
    def full(self) -> bool:
        """True when the cache holds `max_chunks` chunks: start again from the newest real observation."""
        return self.num_chunks >= self.geometry.max_chunks

    def start(self, context_latents: jax.Array, text: jax.Array, proprio: jax.Array | None,
              image_conditioning: tuple[jax.Array, jax.Array] | None = None) -> None:
        """Begins a rollout from clean context latents [B, 1, H, W, C], text [B, L, text_dim], proprio [B, P];
        I2V models also take (condition latents [B, max_frames, H, W, C], CLIP tokens [B, tokens, image_dim])."""
        if self.cfg.image_conditioned != (image_conditioning is not None):
            raise ValueError(f"model.image_dim={self.cfg.image_dim}: image_conditioning must be given exactly for "
                             "an image-conditioned (I2V) model")
        if image_conditioning is not None and image_conditioning[0].shape[1] != self.geometry.max_frames:
            raise ValueError(f"condition latents have shape {image_conditioning[0].shape}; expected "
                             f"{self.geometry.max_frames} latent frames (the cache window)")
        expected = self.geometry.latent_shape(1, context_latents.shape[-1])
        if tuple(context_latents.shape[1:]) != expected:
            raise ValueError(f"context_latents have shape {context_latents.shape}; expected [B, "
                             f"{', '.join(map(str, expected[:-1]))}, C]")
        if (proprio is not None) != self.geometry.with_proprio:
            raise ValueError(f"proprio is {'given' if proprio is not None else 'missing'}; geometry.with_proprio="
                             f"{self.geometry.with_proprio}")
        self.state = start_rollout(self.cfg, self.geometry, self.options, self.params, context_latents, text, proprio,
                                   image_conditioning)
        self.num_chunks = 0
        self.batch = context_latents.shape[0]
        self.proprio = proprio

    def _check_room(self, caller: str) -> None:
        if self.state is None:
            raise RuntimeError(f"{caller}() before start()")
        if self.full:
            raise RuntimeError(f"the KV cache holds max_chunks={self.geometry.max_chunks} chunks; call start() "
                               "again from the newest real observation")

    def generate(self, rng: jax.Array, action_prefix: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Next chunk's predicted latents [B, n, H, W, C] and actions [B, na, A] (also cached as predicted); its
        first k actions held at `action_prefix` [B, k, A] (normalized) when given."""
        self._check_room("generate")
        g, cfg = self.geometry, self.cfg
        rng_v, rng_a = jax.random.split(rng)
        video_noise = jax.random.normal(rng_v, (self.batch, *g.latent_shape(g.frames_per_chunk, cfg.out_channels)))
        action_noise = jax.random.normal(rng_a, (self.batch, g.actions_per_chunk, cfg.action_dim))
        return self.generate_from(video_noise, action_noise, action_prefix=action_prefix)

    def generate_from(self, video_noise: jax.Array, action_noise: jax.Array,
                      proprio: jax.Array | None = None,
                      action_prefix: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`generate` from given starting noise (for reproducible comparisons); `proprio` [B, P] overrides the
        newest state as the chunk's state token (`geometry.proprio_per_chunk` only); `action_prefix` [B, k, A]
        (normalized) holds the chunk's first k actions clean (see `generate_chunk`)."""
        if proprio is not None and not self.geometry.proprio_per_chunk:
            raise ValueError("proprio was given to generate_from but geometry.proprio_per_chunk=False")
        if self.geometry.proprio_per_chunk:
            proprio = self.proprio if proprio is None else proprio
            if proprio.shape != (self.batch, self.cfg.proprio_dim):
                raise ValueError(f"proprio has shape {proprio.shape}; expected ({self.batch}, {self.cfg.proprio_dim})")
        self.state, latents, actions = generate_chunk(
            self.cfg, self.geometry, self.options, self.params, self.state, video_noise, action_noise, self.mode,
            proprio, action_prefix,
        )
        self.num_chunks += 1
        return latents, actions

    def imagine(self, rng: jax.Array, actions: jax.Array) -> jax.Array:
        """World model: the next chunk's predicted latents [B, n, H, W, C] given its actions [B, na, A] (normalized),
        held clean while the frames are denoised; both are cached as the chunk."""
        g = self.geometry
        expected = (self.batch, g.actions_per_chunk, self.cfg.action_dim)
        if tuple(actions.shape) != expected:
            raise ValueError(f"actions have shape {tuple(actions.shape)}; expected {expected} (one chunk's)")
        self._check_room("imagine")
        video_noise = jax.random.normal(rng, (self.batch, *g.latent_shape(g.frames_per_chunk, self.cfg.out_channels)))
        proprio = self.proprio if g.proprio_per_chunk else None
        self.state, latents, _ = generate_chunk(
            self.cfg, g, self.options, self.params, self.state, video_noise, jnp.asarray(actions, jnp.float32),
            "world_model", proprio,
        )
        self.num_chunks += 1
        return latents

    def observe(self, observed_latents: jax.Array, proprio: jax.Array | None = None) -> None:
        """Replaces the newest chunk's predicted frames in the cache with the real observation's latents; the
        robot's state [B, P] at its last frame becomes the next chunk's state token (`proprio_per_chunk`)."""
        if proprio is not None:
            if not self.geometry.proprio_per_chunk:
                raise ValueError("proprio was given to observe but geometry.proprio_per_chunk=False")
            if proprio.shape != (self.batch, self.cfg.proprio_dim):
                raise ValueError(f"proprio has shape {proprio.shape}; expected ({self.batch}, {self.cfg.proprio_dim})")
        if self.state is None or self.num_chunks == 0:
            raise RuntimeError("observe() needs a generated chunk to replace")
        expected = (self.batch, *self.geometry.latent_shape(self.geometry.frames_per_chunk, 0)[:-1])
        if tuple(observed_latents.shape[:-1]) != expected:
            raise ValueError(f"observed_latents have shape {observed_latents.shape}; expected {expected} + (C,)")
        self.state = observe_chunk(self.cfg, self.geometry, self.options, self.params, self.state, observed_latents)
        if proprio is not None:
            self.proprio = proprio
