"""Policy: context frames + proprio + instruction -> an action chunk, from a training checkpoint.

Everything the trainer used to turn raw inputs into model inputs comes from the checkpoint: the VAE (its
config, or the same random tiny VAE seeded by `vae.seed`), the instruction embedder (`text.*`), the
normalization statistics and method. One jitted function per input shape covers VAE encode + sampling
(`wamjax.inference.policy_step`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.standardize import embodiments
from data_pipelines.standardize.normalization import normalize, unnormalize
from wamjax.checkpoint.load import load_checkpoint, load_norm_stats
from wamjax.checkpoint.norm_stats import checked_norm_stats
from wamjax.checkpoint.wan_vae_import import load_vae
from wamjax.compilation_cache import enable_compilation_cache
from wamjax.diffusion.modes import check_mode
from wamjax.diffusion.sampler import SamplerOptions, check_action_prefix, sample
from wamjax.inference import conditioning
from wamjax.inference.policy_step import PolicyShapes, decode_latents, encode_context, sample_from_latents
from wamjax.inference.session import ClosedLoopSession
from wamjax.inference.timing import StageTimer
from wamjax.models import vae as vae_lib
from wamjax.models.encoders import encode_views
from wamjax.models.text import TextEmbedder
from wamjax.models.token_layout import trains_teacher_forced
from wamjax.stages import policy_spec

Params = Any


def select_dataset_stats(norm_stats: Mapping[str, Any], dataset: str | None) -> dict[str, Any] | None:
    """The stats entry of `dataset` (None: the only one); None when the checkpoint has no stats (synthetic)."""
    datasets = dict(norm_stats.get("datasets", {})) if norm_stats else {}
    if not datasets:
        if dataset is not None:
            raise KeyError(f"dataset={dataset!r} was given but the checkpoint has no normalization stats")
        return None
    if dataset is None:
        if len(datasets) > 1:
            raise ValueError(f"checkpoint has stats for {sorted(datasets)}; pass dataset= to pick one")
        return next(iter(datasets.values()))
    if dataset not in datasets:
        raise KeyError(f"dataset={dataset!r} has no normalization stats; known: {sorted(datasets)}")
    return datasets[dataset]


class Policy:
    """A trained world-action model as a policy: `infer(frames, proprio, instruction)` -> action chunk."""

    def __init__(
        self,
        run_config: ml_collections.ConfigDict,
        params: Params,
        norm_stats: Mapping[str, Any] | None = None,
        *,
        options: SamplerOptions | None = None,
        dataset: str | None = None,
        seed: int = 0,
        mode: str = "joint",
        source: str = "the given run",
    ):
        """`source` names where params and stats came from (a checkpoint path) in errors."""
        self.run_config = run_config
        self.spec = policy_spec(run_config)
        self.mode = check_mode(mode)  # how infer() acts unless told otherwise
        self.model_config = self.spec.model
        self.params = jax.tree.map(jnp.asarray, params)
        if "actions" not in self.params:
            raise KeyError("checkpoint params have no 'actions' subtree: a video-only checkpoint is not a policy")
        options = options or SamplerOptions(shift=self.spec.shift)
        # Every call reports its denoising iterations as they finish (`last_timing`).
        self.options = dataclasses.replace(options, time_steps=True)
        self.vae_config, vae_params = load_vae(
            run_config.vae.size, run_config.vae.weights, int(run_config.vae.seed)
        )
        self.vae_params = jax.tree.map(jnp.asarray, vae_params)
        placement = cfg_parallel_placement(self.options.cfg_parallel)
        if placement is not None:  # both CFG branches' devices hold the weights
            self.params, self.vae_params = jax.device_put((self.params, self.vae_params), placement)
        self.last_timing: dict[str, Any] = {}  # policy_timing of the newest infer() (see wamjax.inference.timing)
        self.text_embedder = TextEmbedder(run_config.text, self.model_config.text_dim)
        self.all_stats = checked_norm_stats(run_config, norm_stats, where=source)
        self._for_dataset: dict[str, Policy] = {}
        self.normalization = str(self.spec.data.action_normalization)
        self._act_for(dataset, source)
        self.resolution = self.spec.clip.resolution
        self.num_frames = self.spec.clip.num_frames  # the clip length the model was trained on
        tc = self.vae_config.temporal_compression
        self.num_latent_frames = 1 + (self.num_frames - 1) // tc
        self.num_actions = self.spec.clip.actions  # per-step actions with data.action_horizon > 0
        self.proprio_dim = self.model_config.proprio_dim
        self._rng = jax.random.key(seed)
        self._text_cache: dict[str, np.ndarray] = {}
        self.num_traces = 0  # how many times the policy step was traced (once per input shape)
        self._encode = jax.jit(encode_context, static_argnums=0)
        self._sample = jax.jit(self._sample_step, static_argnums=0)
        self.image_encoder_config, self.image_encoder_params = conditioning.load_image_encoder(
            run_config, self.spec
        )
        self.num_cameras = self.spec.clip.num_cameras
        self.camera_names = list(self.spec.clip.cameras)
        self.views = self.spec.views  # tokens view layout: views per frame, else None

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        num_steps: int = 4,
        action_steps: int | None = None,
        cfg_scale: float = 1.0,
        cfg_batched: bool = True,
        use_ema: bool = True,
        dataset: str | None = None,
        seed: int = 0,
        mode: str = "joint",
        video_stop_t: float = 0.0,
        step_cache_mask: tuple[bool, ...] | None = None,
        step_cache_threshold: float | None = None,
        cfg_parallel: int = 1,
        compilation_cache_dir: str = "",
        lora_base: str | None = None,
    ) -> Policy:
        """Loads a checkpoint step directory (or a run's `checkpoints/`, taking its newest step).

        `dataset` picks the normalization stats when the checkpoint was trained on a mixture. The real-time
        knobs (video_stop_t, step_cache_mask, step_cache_threshold, cfg_parallel) are `SamplerOptions`'.
        `compilation_cache_dir` is JAX's persistent compilation cache (`wamjax.compilation_cache`): "" keeps
        the one JAX has, else the user's cache directory; "off" for none. An adapters-only checkpoint is read
        onto `lora_base` when given, else onto the base it names.
        """
        enable_compilation_cache(compilation_cache_dir)
        # The parameters alone (no optimizer state), read straight onto the device the policy runs on.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        run_config, params = load_checkpoint(path, use_ema=use_ema, sharding=device, base=lora_base)
        options = SamplerOptions(
            num_steps=num_steps, action_steps=action_steps, cfg_scale=cfg_scale, cfg_batched=cfg_batched,
            shift=policy_spec(run_config).shift, video_stop_t=video_stop_t,
            step_cache_mask=None if step_cache_mask is None else tuple(step_cache_mask),
            step_cache_threshold=step_cache_threshold, cfg_parallel=cfg_parallel,
        )
        return cls(run_config, params, load_norm_stats(path), options=options, dataset=dataset, seed=seed,
                   mode=mode, source=f"checkpoint {path}")

    # --- Host-side preparation -----------------------------------------------------------------------

    def prepare_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] or [H, W, 3] -> [T, h, w, 3] at the training resolution, checked. A policy trained
        on several cameras takes them as a list (or a views axis, see `conditioning.combine_cameras`)."""
        frames = conditioning.combine_cameras(frames, self.spec, conditioning.resize_frames)
        view_axes = 0 if self.views is None else 1  # tokens layout: [T, V, H, W, 3], already resized
        if frames.ndim == 3 + view_axes:
            frames = frames[None]
        if frames.ndim != 4 + view_axes or frames.shape[-1] != 3:
            expected = "[T, H, W, 3] or [H, W, 3]" if not view_axes else f"[T, {self.views}, H, W, 3]"
            raise ValueError(f"frames have shape {frames.shape}; expected {expected}")
        if frames.dtype != np.uint8:
            raise TypeError(f"frames have dtype {frames.dtype}; expected uint8")
        tc = self.vae_config.temporal_compression
        t = frames.shape[0]
        context_latents = 1 + (t - 1) // tc
        if (t - 1) % tc or context_latents >= self.num_latent_frames:
            raise ValueError(
                f"{t} context frames; expected 1 + {tc}k frames encoding to fewer than the "
                f"{self.num_latent_frames} latent frames of a training clip ({self.num_frames} frames)"
            )
        return frames if view_axes else conditioning.resize_frames(frames, self.resolution)

    def prepare_proprio(self, proprio: np.ndarray | None) -> np.ndarray:
        """Raw proprio [P <= proprio_dim] -> normalized, zero-padded [proprio_dim] float32."""
        if proprio is None:
            return np.zeros(self.proprio_dim, np.float32)
        proprio = np.asarray(proprio, np.float32)
        if proprio.ndim != 1 or proprio.shape[0] > self.proprio_dim:
            raise ValueError(f"proprio has shape {proprio.shape}; expected [P] with P <= {self.proprio_dim}")
        if not np.all(np.isfinite(proprio)):
            raise ValueError(f"proprio has non-finite values: {proprio.tolist()}")
        proprio = np.pad(proprio, (0, self.proprio_dim - proprio.shape[0]))
        if self.stats is not None:
            # The data pipeline normalizes proprio by mean/std whatever data.action_normalization says.
            proprio = normalize(proprio, self.stats["proprio"], "normal")
        return proprio

    def embed_instruction(self, instruction: str) -> np.ndarray:
        """[L, text_dim] embedding of the instruction, exactly as the trainer embedded it."""
        if not isinstance(instruction, str):
            raise TypeError(f"instruction is {type(instruction).__name__}; expected str")
        if instruction not in self._text_cache:
            self._text_cache[instruction] = self.text_embedder(np.array([instruction]))[0]
        return self._text_cache[instruction]

    # --- The jitted step -------------------------------------------------------------------------------

    def _sample_step(self, shapes: PolicyShapes, params, latents, image_conditioning, text, proprio, rng,
                     action_prefix=None):
        self.num_traces += 1
        return sample_from_latents(shapes, params, latents, image_conditioning, text, proprio, rng, action_prefix)

    def for_dataset(self, dataset: str) -> Policy:
        """This policy acting for another dataset of its run (its embodiment, stats and action space); the weights
        and compiled steps are shared."""
        if dataset == self.dataset:
            return self
        if dataset not in self._for_dataset:
            view = copy.copy(self)
            view._act_for(dataset, f"dataset {dataset!r}")
            view.__dict__.pop("metadata", None)  # its own metadata, computed on first use
            self._for_dataset[dataset] = view
        return self._for_dataset[dataset]

    def _act_for(self, dataset: str | None, source: str) -> None:
        """Sets the dataset this policy acts for: its stats and its robot's action layout (the dataset's embodiment,
        padded into model.action_dim in training), checked against the model's width."""
        self.dataset = dataset
        self.stats = select_dataset_stats(self.all_stats, dataset)
        self.embodiment = embodiments.get_embodiment((self.stats or {}).get("embodiment", "eef7"))
        self.robot_action_dim = (len(self.stats["action"]["mask"]) if self.stats is not None
                                 else self.model_config.action_dim)
        if self.robot_action_dim > self.model_config.action_dim:
            raise ValueError(f"{source}: the dataset's actions have {self.robot_action_dim} dimensions, more than "
                             f"model.action_dim={self.model_config.action_dim}")

    def _reference_state(self, proprio: np.ndarray | None) -> np.ndarray | None:
        """The raw state relative actions are measured from (the observation's proprio), checked."""
        if not self.embodiment.relative_to_state:
            return None
        if proprio is None:
            raise ValueError(f"this policy's embodiment {self.embodiment.name!r} acts relative to the current state: "
                             f"send the observation's proprio")
        return np.asarray(proprio, np.float32)

    def actions_to_model(self, actions: np.ndarray, proprio: np.ndarray | None) -> np.ndarray:
        """The robot's raw actions [k, robot_action_dim] -> the model's normalized, padded [k, action_dim]."""
        actions = np.asarray(actions, np.float32)
        state = self._reference_state(proprio)
        if state is not None:
            actions = self.embodiment.to_relative(actions, state)
        if self.stats is not None:
            actions = normalize(actions, self.stats["action"], self.normalization)
        return embodiments.pad_actions(actions, self.model_config.action_dim, "the policy's input")

    def actions_from_model(self, actions: np.ndarray, proprio: np.ndarray | None) -> np.ndarray:
        """The model's normalized [T, action_dim] -> the robot's raw [T, robot_action_dim] (its own dimensions,
        unnormalized, made absolute where its embodiment acts relative to the state)."""
        actions = np.asarray(actions, np.float32)[..., : self.robot_action_dim]
        if self.stats is not None:
            actions = unnormalize(actions, self.stats["action"], self.normalization)
        state = self._reference_state(proprio)
        return actions if state is None else self.embodiment.to_absolute(actions, state)

    def prepare_action_prefix(self, action_prefix: np.ndarray, proprio: np.ndarray | None = None) -> np.ndarray:
        """Raw actions [k, robot_action_dim] already chosen for the chunk's start -> the model's, checked."""
        action_prefix = np.asarray(action_prefix, np.float32)
        check_action_prefix(action_prefix, self.num_actions, self.robot_action_dim)
        if action_prefix.ndim != 2:
            raise ValueError(f"action_prefix has shape {action_prefix.shape}; expected [k, {self.robot_action_dim}]")
        if not np.all(np.isfinite(action_prefix)):
            raise ValueError("action_prefix has non-finite values")
        return self.actions_to_model(action_prefix, proprio)

    def _imagine_step(self, shapes: PolicyShapes, params, vae_params, frames, text, proprio, actions, rng,
                      image_params=None):
        self.num_traces += 1
        latents, image_conditioning = encode_context(shapes, vae_params, frames, image_params)
        video_noise = jax.random.normal(rng, (latents.shape[0], shapes.future_frames, *latents.shape[2:]),
                                        jnp.float32)
        out = sample(shapes.model, params, latents, text, proprio, video_noise, None, options=shapes.options,
                     clean_actions=actions, image_conditioning=image_conditioning)
        return out.latents, decode_latents(shapes.vae, vae_params, out.latents)

    def infer(
        self,
        frames: np.ndarray,
        proprio: np.ndarray | None,
        instruction: str,
        *,
        return_latents: bool = False,
        mode: str | None = None,
        action_prefix: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Action chunk for one observation.

        action_prefix: raw actions [k, action_dim] (k <= the chunk) already chosen for the chunk's start, e.g. the
        ones that execute while it is computed (real-time chunking): they are held clean while the rest of the
        chunk is denoised around them, and returned as given (joint mode, full-sequence models).

        mode (default: the policy's): "joint" denoises video and actions together; "imagine_then_act" first
        generates the future video (actions held at noise), then infers the actions with that video held clean
        (inverse dynamics on the imagined video).

        frames: uint8 [T_ctx, H, W, 3] (T_ctx = 1 + 4k) or [H, W, 3], any size (resized to the training
        resolution); for a policy trained on several cameras, one such array per camera in a list. Image-
        conditioned (I2V) models are conditioned on the first context frame, as in training. proprio: raw [P].
        Returns {"actions": [T_a, action_dim] float32 in the dataset's raw units}
        and, with `return_latents`, "latents": the predicted clip [F, h, w, C] in the DiT's normalized
        latent scale (context frames first).

        A teacher-forced chunk-causal model (model.history="teacher_forcing") given one context frame denoises
        its chunks one after another through the KV cache, each against its own clean predictions before it.
        """
        mode = check_mode(self.mode if mode is None else mode)
        timer = StageTimer()
        text = self.embed_instruction(instruction)
        timer.stage("text_ms")
        prepared = self.prepare_frames(frames)
        context_latents = 1 + (prepared.shape[0] - 1) // self.vae_config.temporal_compression
        if action_prefix is not None and mode != "joint":
            raise ValueError(f"action_prefix is supported in mode 'joint'; this call's mode is {mode!r}")
        if trains_teacher_forced(self.model_config) and context_latents == 1:
            return self._infer_chunk_by_chunk(frames, proprio, instruction, mode, return_latents, timer,
                                              action_prefix)
        if action_prefix is not None:
            prefix = self.prepare_action_prefix(action_prefix, proprio)[None]
        else:
            prefix = None
        frames = prepared
        proprio_norm = self.prepare_proprio(proprio)
        shapes = PolicyShapes(
            self.model_config, self.vae_config, self.options, self.num_latent_frames - context_latents,
            self.num_actions, stop_after_actions=not return_latents and mode == "joint", mode=mode,
            image_encoder=self.image_encoder_config, num_frames=self.num_frames,
        )
        self._rng, rng = jax.random.split(self._rng)
        latents, image_conditioning = self._encode(shapes, self.vae_params, frames[None], self.image_encoder_params)
        timer.stage("encode_ms", latents)
        timer.begin_denoising()
        out = self._sample(shapes, self.params, latents, image_conditioning, text[None], proprio_norm[None], rng,
                           prefix)
        timer.end_denoising(out)
        actions = self.actions_from_model(np.asarray(out.actions[0], np.float32), proprio)
        if action_prefix is not None:  # exactly the actions given, not their normalization round trip
            actions = np.concatenate([np.asarray(action_prefix, np.float32), actions[len(action_prefix):]])
        result = {"actions": actions}
        if return_latents:
            result["latents"] = np.asarray(out.latents[0], np.float32)
        timer.stage("decode_ms")
        self.last_timing = timer.timing()
        return result

    def _clip_rollout(self, frames: Any, proprio: np.ndarray | None, instruction: str,
                      mode: str, timer: StageTimer | None = None) -> ClosedLoopSession:
        """A KV-cache session over the trained clip's chunks, checked to hold all of its actions."""
        session = ClosedLoopSession(self, frames, proprio, instruction, mode=mode, timer=timer)
        g = session.geometry
        if g.actions_per_chunk * g.max_chunks < self.num_actions:
            raise RuntimeError(f"the KV-cache rollout takes {g.actions_per_chunk} actions x {g.max_chunks} chunks; "
                               f"the clip has {self.num_actions}")
        return session

    def _infer_chunk_by_chunk(self, frames: Any, proprio: np.ndarray | None, instruction: str, mode: str,
                              return_latents: bool, timer: StageTimer | None = None,
                              action_prefix: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """`infer` for a teacher-forced model: its chunks are denoised one after another, each against the KV
        cache of the clean chunks before it (its own predictions), as in training; not all at once. A prefix
        holds the first actions of the chunks it reaches."""
        timer = timer or StageTimer()
        if action_prefix is not None:
            check_action_prefix(np.asarray(action_prefix), self.num_actions, self.robot_action_dim)
        session = self._clip_rollout(frames, proprio, instruction, mode, timer)
        per_chunk = session.geometry.actions_per_chunk
        actions, latents = [], [session.context_latents]
        for i in range(session.geometry.max_chunks):
            if i:
                session.keep_prediction()
            part = None if action_prefix is None else np.asarray(action_prefix)[i * per_chunk:(i + 1) * per_chunk]
            actions.append(session.next_actions(timer, None if part is None or not len(part) else part))
            latents.append(session.last_latents)
        result = {"actions": np.concatenate(actions)[: self.num_actions]}
        if return_latents:
            result["latents"] = np.asarray(jnp.concatenate(latents, axis=1)[0], np.float32)
        timer.stage("decode_ms")
        self.last_timing = timer.timing()
        return result

    def imagine(
        self, frames: np.ndarray, actions: np.ndarray, instruction: str, proprio: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """World model: the future given an action chunk, held clean while the video is denoised.

        frames as in `infer`; actions: raw [T_a, action_dim] in the dataset's units (T_a = the policy's
        action_horizon). Returns "latents" [F, h, w, C] (normalized latent scale, context frames first) and
        "frames" uint8 [num_frames, h, w, 3]: the VAE decode of the whole predicted clip. A teacher-forced model
        given one context frame predicts chunk by chunk through the KV cache, as `infer` does.
        """
        actions = np.asarray(actions, np.float32)
        expected = (self.num_actions, self.robot_action_dim)
        if actions.shape != expected:
            raise ValueError(f"actions have shape {actions.shape}; expected {expected} (action_horizon, the robot's "
                             f"action_dim)")
        if not np.all(np.isfinite(actions)):
            raise ValueError("actions have non-finite values")
        actions = self.actions_to_model(actions, proprio)
        prepared = self.prepare_frames(frames)
        context_latents = 1 + (prepared.shape[0] - 1) // self.vae_config.temporal_compression
        if trains_teacher_forced(self.model_config) and context_latents == 1:
            return self._imagine_chunk_by_chunk(frames, actions, instruction, proprio)
        frames = prepared
        proprio_norm = self.prepare_proprio(proprio)
        text = self.embed_instruction(instruction)
        shapes = PolicyShapes(self.model_config, self.vae_config, self.options,
                              self.num_latent_frames - context_latents, self.num_actions, False, mode="world_model",
                              image_encoder=self.image_encoder_config, num_frames=self.num_frames)
        self._rng, rng = jax.random.split(self._rng)
        latents, video = self._imagine_jit(shapes, self.params, self.vae_params, frames[None], text[None],
                                           proprio_norm[None], jnp.asarray(actions)[None], rng,
                                           self.image_encoder_params)
        return {"latents": np.asarray(latents[0], np.float32), "frames": vae_lib.video_to_frames(video[0])}

    def _imagine_chunk_by_chunk(self, frames: Any, actions: np.ndarray, instruction: str,
                                proprio: np.ndarray | None) -> dict[str, np.ndarray]:
        """`imagine` for a teacher-forced model: chunk by chunk through the KV cache, each chunk's frames denoised
        against the clean predictions before it, with its own slice of the (normalized) actions held clean."""
        session = self._clip_rollout(frames, proprio, instruction, self.mode)
        per_chunk = session.geometry.actions_per_chunk
        latents = [session.context_latents]
        for i in range(session.geometry.max_chunks):
            self._rng, rng = jax.random.split(self._rng)
            chunk = jnp.asarray(actions[i * per_chunk : (i + 1) * per_chunk])[None]
            latents.append(session.rollout.imagine(rng, chunk))
        latents = jnp.concatenate(latents, axis=1)
        video = self._decode_jit(self.vae_config, self.vae_params, latents)
        return {"latents": np.asarray(latents[0], np.float32), "frames": vae_lib.video_to_frames(video[0])}

    @functools.cached_property
    def _decode_jit(self):
        return jax.jit(decode_latents, static_argnums=0)

    @functools.cached_property
    def _imagine_jit(self):
        return jax.jit(self._imagine_step, static_argnums=0)

    def start_rollout(
        self, frame: np.ndarray, proprio: np.ndarray | None, instruction: str, *, max_chunks: int | None = None,
        mode: str | None = None,
    ) -> ClosedLoopSession:
        """Closed-loop control chunk by chunk with the KV cache (chunk-causal checkpoints only); `mode` as in
        `infer` (default: the policy's)."""
        return ClosedLoopSession(self, frame, proprio, instruction, max_chunks=max_chunks,
                                 mode=self.mode if mode is None else mode)

    def encode_frames(self, frames: np.ndarray) -> jax.Array:
        """uint8 [T, h, w, 3] at the training resolution -> normalized latents [1, 1 + (T-1)/4, H', W', C]
        ([T, V, h, w, 3] -> [1, 1 + (T-1)/4, V, H', W', C] for the tokens view layout)."""
        video = vae_lib.frames_to_video(jnp.asarray(frames)[None])
        return vae_lib.normalize_latents(self.vae_config, encode_views(self.vae_config, self.vae_params, video))

    @functools.cached_property
    def metadata(self) -> dict[str, Any]:
        """What a client needs to know about this policy (sent by the server on connect)."""
        return {
            "action_horizon": self.num_actions,
            "action_dim": self.robot_action_dim,  # the robot's own; the model's is model_action_dim
            "model_action_dim": self.model_config.action_dim,
            "embodiment": self.embodiment.name,
            "dataset": self.dataset,
            # Every robot of the run: a request's `dataset` key picks one (its embodiment and raw action space).
            "datasets": {
                name: {"embodiment": entry.get("embodiment", "eef7"), "action_dim": len(entry["action"]["mask"])}
                for name, entry in (self.all_stats or {}).get("datasets", {}).items()
            },
            "proprio_dim": self.proprio_dim,
            "resolution": list(self.resolution),
            "context_frames": 1,
            "num_steps": self.options.num_steps,
            "action_steps": self.options.resolved_action_steps,
            "cfg_scale": self.options.cfg_scale,
            "normalized": self.stats is not None,
            "mode": self.mode,
            "cameras": self.num_cameras,
            "camera_names": list(self.camera_names),
            "view_layout": "tokens" if self.views is not None else "tile",
        }


def cfg_parallel_placement(cfg_parallel: int) -> jax.sharding.NamedSharding | None:
    """Where a policy with `cfg_parallel` devices per CFG pair keeps its weights (replicated over them), or None
    for one device."""
    devices = jax.devices()  # SamplerOptions checked that cfg_parallel divides them
    if cfg_parallel == 1:
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices[:cfg_parallel]), ("cfg",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
