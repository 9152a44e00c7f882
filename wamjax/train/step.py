"""The train state and the pure, jitted train step: frames -> frozen VAE -> noised latents/actions -> loss."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wamjax.diffusion import flow
from wamjax.diffusion.modes import draw_clean_modalities
from wamjax.models import clip
from wamjax.models import vae as vae_lib
from wamjax.models.config import ModelConfig
from wamjax.models.dit import action_latent_frame, latent_frame_chunk
from wamjax.models.wam import first_frame_video, i2v_model_input, wam_forward

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree (checkpointed as is)."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    ema_params: Params | None
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static facts the step is compiled for."""

    model: ModelConfig
    mode: str  # "video" | "joint"
    clean_context_frames: int
    vae: Any | None  # VAEConfig when frames are encoded online; None when batches carry latents
    pad_to_multiple: int = 1
    image_encoder: clip.CLIPVisionConfig | None = None  # image-conditioned (I2V) models: the frozen CLIP tower


def nonfinite_count(opt_state: optax.OptState) -> jax.Array:
    """Consecutive non-finite updates so far (from optax.apply_if_finite's state)."""
    return opt_state.notfinite_count


def frames_to_latents(vae_config: Any, vae_params: Params, frames: jax.Array) -> jax.Array:
    """uint8 frames [B, T, H, W, 3] -> normalized VAE latents [B, 1+(T-1)/4, H/8, W/8, z], no gradients."""
    latents = vae_lib.vae_encode(vae_config, vae_params, vae_lib.frames_to_video(frames))
    return jax.lax.stop_gradient(vae_lib.normalize_latents(vae_config, latents))


def i2v_latents_and_conditioning(
    spec: StepSpec, vae_params: Params, image_encoder_params: Params, frames: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Wan2.1-I2V inputs of uint8 clips [B, T, H, W, 3], frozen: the clips' normalized latents, and as
    conditioning the normalized latents of the first frame followed by zero frames and the first frame's CLIP
    tokens. Clips and conditioning videos go through the VAE as one batch (one encoder in the compiled step)."""
    video = vae_lib.frames_to_video(frames)
    both = vae_lib.vae_encode(spec.vae, vae_params, jnp.concatenate([video, first_frame_video(video)], axis=0))
    both = jax.lax.stop_gradient(vae_lib.normalize_latents(spec.vae, both))
    x0, condition = jnp.split(both, 2, axis=0)
    image = clip.encode_frames(spec.image_encoder, image_encoder_params, frames[:, 0])
    return x0, {"condition_latents": condition, "image_embeddings": image}


def time_sampling(diffusion: ml_collections.ConfigDict, modality: str) -> tuple[str, str]:
    """(distribution, config key) of `modality`'s ("video" | "action") training times.

    `diffusion.<modality>_time_sampling` when set, else the shared `diffusion.time_sampling`.
    """
    key = f"{modality}_time_sampling"
    own = str(diffusion.get(key, "") or "")
    if own:
        return own, f"diffusion.{key}"
    return str(diffusion.time_sampling), "diffusion.time_sampling"


def check_diffusion_config(diffusion: ml_collections.ConfigDict) -> None:
    """Raises naming the key on an unknown time distribution or bad Beta parameters."""
    for modality in ("video", "action"):
        flow.check_time_sampling(*time_sampling(diffusion, modality))
    for key in ("beta_a", "beta_b"):
        if float(diffusion.get(key, 1.0)) <= 0:
            raise ValueError(f"diffusion.{key}={diffusion.get(key)}; expected > 0")


def sample_chunk_times(
    rng: jax.Array, chunk_ids: np.ndarray, batch: int, diffusion: ml_collections.ConfigDict, modality: str = "video"
) -> jax.Array:
    """One flow time per (example, attention chunk), spread to the items of each chunk -> [B, len(chunk_ids)]."""
    num_chunks = int(chunk_ids.max()) + 1 if len(chunk_ids) else 1
    sampling, key = time_sampling(diffusion, modality)
    t = flow.sample_time(
        rng, (batch, num_chunks), sampling, diffusion.shift, diffusion.logit_mean, diffusion.logit_std,
        float(diffusion.get("beta_a", 3.0)), float(diffusion.get("beta_b", 1.0)), key=key,
    )
    return t[:, chunk_ids]


def example_has_actions(batch: dict[str, jax.Array]) -> jax.Array:
    """[B] float: 1 for examples whose actions train, 0 for video-only ones (their action loss is masked).

    Batches without `has_actions` (e.g. from a latents cache) count an example as action-bearing when any
    of its actions is valid.
    """
    if "has_actions" in batch:
        return batch["has_actions"].astype(jnp.float32)
    return jnp.any(batch["action_mask"], axis=-1).astype(jnp.float32)


def compute_loss(
    spec: StepSpec,
    diffusion: ml_collections.ConfigDict,
    params: Params,
    x0: jax.Array,
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss per modality; the total is their weighted sum."""
    cfg = spec.model
    b, f = x0.shape[:2]
    rng_tv, rng_ta, rng_nv, rng_na, rng_drop = jax.random.split(rng, 5)
    frame_chunks = latent_frame_chunk(cfg, f)
    t_video = sample_chunk_times(rng_tv, frame_chunks, b, diffusion)
    context = np.arange(f) < spec.clean_context_frames
    t_video = jnp.where(context[None], 0.0, t_video)
    # Per example: video clean (inverse dynamics) or actions clean (world model); None = all joint. Its own
    # key (fold_in) leaves the default draws untouched, so the default config trains exactly as before.
    clean = draw_clean_modalities(jax.random.fold_in(rng, 1), b, diffusion) if spec.mode == "joint" else None
    if clean is not None:
        t_video = jnp.where(clean.video[:, None], 0.0, t_video)
    noise = jax.random.normal(rng_nv, x0.shape, x0.dtype)
    xt = flow.add_noise(x0, noise, t_video)
    text = batch["text_embeddings"]
    keep_text = jax.random.bernoulli(rng_drop, 1.0 - diffusion.text_dropout, (b, 1, 1))
    text = jnp.where(keep_text, text, 0.0)

    actions = t_action = noisy_actions = action_noise = proprio = None
    if spec.mode == "joint":
        actions = batch["actions"]
        action_chunks = frame_chunks[np.minimum(action_latent_frame(cfg, actions.shape[1]), f - 1)]
        if diffusion.independent_action_time:
            t_action = sample_chunk_times(rng_ta, action_chunks, b, diffusion, "action")
        else:
            t_action = t_video[:, np.minimum(action_latent_frame(cfg, actions.shape[1]), f - 1)]
        if clean is not None:
            t_action = jnp.where(clean.actions[:, None], 0.0, t_action)
        action_noise = jax.random.normal(rng_na, actions.shape, actions.dtype)
        noisy_actions = flow.add_noise(actions, action_noise, t_action)
        proprio = batch["proprio"]

    image = None
    if cfg.image_conditioned:
        xt = i2v_model_input(xt, batch["condition_latents"])
        image = batch["image_embeddings"]
    out = wam_forward(
        cfg, params, xt, flow.to_model_timestep(t_video), text,
        noisy_actions, None if t_action is None else flow.to_model_timestep(t_action), proprio, image,
        pad_to_multiple=spec.pad_to_multiple,
    )
    frame_weight = jnp.asarray(~context, jnp.float32)
    video_err = jnp.mean(jnp.square(out.video - flow.velocity_target(x0, noise)), axis=(2, 3, 4))
    if clean is None:
        loss_video = jnp.sum(video_err * frame_weight) / (b * jnp.maximum(frame_weight.sum(), 1.0))
    else:
        # A clean modality is an input, not a target: its loss is not counted for that example (as in UVA and
        # DreamZero); the mean is over the examples and items that do count.
        weight = frame_weight[None] * (~clean.video)[:, None]
        loss_video = jnp.sum(video_err * weight) / jnp.maximum(weight.sum(), 1.0)
    metrics = {"loss_video": loss_video}
    loss = diffusion.video_loss_weight * loss_video
    if spec.mode == "joint":
        has_actions = example_has_actions(batch)
        mask = batch["action_mask"].astype(jnp.float32) * has_actions[:, None]
        metrics["actions_share"] = jnp.mean(has_actions)
        if clean is not None:
            mask = mask * (~clean.actions)[:, None]
        action_err = jnp.mean(jnp.square(out.actions - flow.velocity_target(actions, action_noise)), axis=-1)
        loss_action = jnp.sum(action_err * mask) / jnp.maximum(mask.sum(), 1.0)
        metrics["loss_action"] = loss_action
        loss = loss + diffusion.action_loss_weight * loss_action
    metrics["loss"] = loss
    return loss, metrics


def make_train_step(
    spec: StepSpec, diffusion: ml_collections.ConfigDict, tx: optax.GradientTransformation,
    schedule: optax.Schedule, ema_decay: float, stage_start_step: int = 0,
):
    """Returns the pure step `(state, batch, frozen_params) -> (state, metrics)`; frozen_params are the VAE's, or
    for an image-conditioned model {"vae": ..., "image_encoder": ...}."""
    check_diffusion_config(diffusion)

    def train_step(state: TrainState, batch: dict[str, jax.Array], frozen_params: Params):
        rng, step_rng = jax.random.split(state.rng)
        if spec.model.image_conditioned:
            x0, conditioning = i2v_latents_and_conditioning(
                spec, frozen_params["vae"], frozen_params["image_encoder"], batch["frames"]
            )
            batch = {**batch, **conditioning}
        elif "latents" in batch:  # a latents cache stores them unnormalized
            x0 = vae_lib.normalize_latents(spec.vae, batch["latents"].astype(jnp.float32))
        else:
            x0 = frames_to_latents(spec.vae, frozen_params, batch["frames"])
        grad_fn = jax.value_and_grad(lambda p: compute_loss(spec, diffusion, p, x0, batch, step_rng), has_aux=True)
        (_, metrics), grads = grad_fn(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = opt_state.last_finite
        ema = state.ema_params
        if ema is not None:
            new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
            ema = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_ema, ema)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step - stage_start_step)
        metrics["update_skipped"] = jnp.logical_not(finite).astype(jnp.int32)
        metrics["nonfinite_in_a_row"] = nonfinite_count(opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, rng=rng)
        return new_state, metrics

    return train_step
