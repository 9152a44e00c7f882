"""Closed-loop control chunk by chunk: a policy's KV-cached rollout, anchored on the first observation and fed
each new one (`Policy.start_rollout`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from wamjax.diffusion.modes import check_mode
from wamjax.inference import conditioning
from wamjax.inference.kv_cache import ChunkedRollout, ChunkGeometry
from wamjax.inference.timing import StageTimer

if TYPE_CHECKING:
    from wamjax.inference.policy import Policy


class ClosedLoopSession:
    """DreamZero-style closed loop: `next_actions()` denoises only the next chunk against the KV cache of past
    chunks; `observe(frames)` replaces that chunk's predicted frames in the cache with the real ones.

    The history is never re-encoded. When the cache holds `max_chunks` chunks (default: the trained clip's
    horizon), the next call starts a fresh cache from the newest real frame and proprio. Observed frames are
    VAE-encoded with the previous real frame as causal context, an approximation of encoding the whole clip.
    """

    def __init__(self, policy: Policy, frame: np.ndarray, proprio: np.ndarray | None, instruction: str,
                 *, max_chunks: int | None = None, mode: str = "joint", timer: StageTimer | None = None):

        timer = timer or StageTimer()
        self.policy = policy
        cfg = policy.model_config
        frames_per_chunk = max(cfg.chunk_latent_frames, 1)
        if max_chunks is None:
            max_chunks = (policy.num_latent_frames - 1) // frames_per_chunk
        sc = policy.vae_config.spatial_compression
        latent_hw = (policy.resolution[0] // sc, policy.resolution[1] // sc)
        # A model trained with one state per chunk (data.proprio_chunk_frames) reads each chunk's own state.
        per_chunk = policy.spec.clip.states is not None
        self.geometry = ChunkGeometry.for_model(cfg, latent_hw, max_chunks, views=policy.views,
                                                proprio_per_chunk=per_chunk)
        self.rollout = ChunkedRollout(cfg, policy.params, self.geometry, policy.options, mode=check_mode(mode))
        self.text = jnp.asarray(policy.embed_instruction(instruction))[None]
        timer.stage("text_ms")
        self.frames_per_observation = frames_per_chunk * policy.vae_config.temporal_compression
        self.last_latents: jax.Array | None = None  # the newest chunk's predicted latents
        # Encoding and prefill since the last chunk (the anchor, an observation) count towards the next one.
        self._pending = timer
        self.last_timing: dict[str, Any] = {}  # policy_timing of the newest next_actions()
        self._anchor(policy.prepare_frames(frame)[-1], proprio, timer)

    def _anchor(self, frame: np.ndarray, proprio: np.ndarray | None, timer: StageTimer) -> None:
        self.last_frame, self.raw_proprio = frame, proprio
        normalized = self.policy.prepare_proprio(proprio)
        image_conditioning = None
        policy = self.policy
        if policy.image_encoder_config is not None:
            # The anchor frame conditions the whole cache window, as a clip's first frame does in training.
            frames = (self.geometry.max_frames - 1) * policy.vae_config.temporal_compression + 1
            image_conditioning = conditioning.i2v_conditioning(
                policy.vae_config, policy.vae_params, policy.image_encoder_config, policy.image_encoder_params,
                jnp.asarray(frame)[None], frames,
            )
        self.context_latents = self.policy.encode_frames(frame[None])
        timer.stage("encode_ms", (self.context_latents, image_conditioning))
        self.rollout.start(self.context_latents, self.text, jnp.asarray(normalized)[None],
                           image_conditioning=image_conditioning)
        timer.stage("prefill_ms", self.rollout.state)
        self.awaiting_observation = False

    def next_actions(self, timer: StageTimer | None = None, action_prefix: np.ndarray | None = None) -> np.ndarray:
        """The next chunk's actions [actions_per_chunk, action_dim] in raw units; `last_timing` gets its stages
        (with the encoding and cache prefill of the observation before it). `action_prefix` (raw [k, action_dim],
        k <= the chunk's actions) holds the chunk's first k actions, returned unchanged (real-time chunking)."""
        if self.awaiting_observation:
            raise RuntimeError("next_actions() twice without observe(): pass the real frames of the last chunk")
        if timer is None:
            timer, self._pending = self._pending or StageTimer(), None
            own_timer = True
        else:
            own_timer = False
        if self.rollout.full:
            self._anchor(self.last_frame, self.raw_proprio, timer)
        self.policy._rng, rng = jax.random.split(self.policy._rng)
        prefix = None
        if action_prefix is not None:
            prefix = jnp.asarray(self.policy.prepare_action_prefix(action_prefix, self.raw_proprio))[None]
        timer.begin_denoising()
        self.last_latents, actions = self.rollout.generate(rng, action_prefix=prefix)
        timer.end_denoising(actions)
        self.awaiting_observation = True
        actions = self.policy.actions_from_model(np.asarray(actions[0], np.float32), self.raw_proprio)
        if action_prefix is not None:  # exactly the actions given, not their normalization round trip
            actions = np.concatenate([np.asarray(action_prefix, np.float32), actions[len(action_prefix):]])
        if own_timer:
            timer.stage("decode_ms")
            self.last_timing = timer.timing()
        return actions

    def keep_prediction(self) -> None:
        """Goes on from the last chunk's predicted frames (already in the cache) as if they had been observed:
        open-loop imagination, without a camera."""
        if not self.awaiting_observation:
            raise RuntimeError("keep_prediction() without a generated chunk: call next_actions() first")
        self.awaiting_observation = False

    def observe(self, frames: np.ndarray, proprio: np.ndarray | None = None) -> None:
        """The real frames uint8 [4 * chunk_latent_frames, H, W, 3] recorded while the last chunk executed (one
        such array per camera, in a list, for a policy trained on several) and the raw state at the last of them:
        the next chunk's state token for a model trained with one state per chunk (without it the newest state
        given is reused), else kept for the next re-anchoring."""
        frames = conditioning.combine_cameras(frames, self.policy.spec, conditioning.resize_frames)
        views = self.policy.views
        if frames.ndim != (4 if views is None else 5) or frames.shape[0] != self.frames_per_observation:
            view_axis = "" if views is None else f"{views}, "
            raise ValueError(f"observed frames have shape {frames.shape}; expected "
                             f"[{self.frames_per_observation}, {view_axis}H, W, 3]")
        if frames.dtype != np.uint8:
            raise TypeError(f"observed frames have dtype {frames.dtype}; expected uint8")
        if not self.awaiting_observation:
            raise RuntimeError("observe() without a generated chunk: call next_actions() first")
        if views is None:
            frames = conditioning.resize_frames(frames, self.policy.resolution)
        state = None
        timer = self._pending = StageTimer()
        if proprio is not None:
            normalized = self.policy.prepare_proprio(proprio)  # checked before the cache changes
            state = jnp.asarray(normalized)[None] if self.geometry.proprio_per_chunk else None
        latents = self.policy.encode_frames(np.concatenate([self.last_frame[None], frames]))
        timer.stage("encode_ms", latents)
        self.rollout.observe(latents[:, 1:], state)
        timer.stage("prefill_ms", self.rollout.state)
        self.last_frame = frames[-1]
        if proprio is not None:
            self.raw_proprio = proprio
        self.awaiting_observation = False
