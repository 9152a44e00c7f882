"""The train state and the pure, jitted train step: frames -> frozen VAE -> noised latents/actions -> loss."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wamjax.diffusion import flow
from wamjax.diffusion.modes import draw_action_prefix, draw_clean_modalities
from wamjax.diffusion.time_sampling import check_diffusion_config, sample_chunk_times
from wamjax.models import clip
from wamjax.models import vae as vae_lib
from wamjax.models.config import ModelConfig
from wamjax.models.encoders import frames_to_latents, i2v_latents_and_conditioning
from wamjax.models.token_layout import (
    action_latent_frame,
    latent_frame_chunk,
    trains_teacher_forced,
)
from wamjax.models.wam import i2v_model_input, wam_forward
from wamjax.train.optimizer import spike_skipped, trainable_labels

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
    microbatches: int = 1  # train.microbatches: the batch is split into this many, one optimizer step
    trainable: str = "all"  # stages.<stage>.trainable: gradients are taken w.r.t. these parameters only


def nonfinite_count(opt_state: optax.OptState) -> jax.Array:
    """Consecutive non-finite updates so far (from optax.apply_if_finite's state)."""
    return opt_state.notfinite_count


def example_has_actions(batch: dict[str, jax.Array]) -> jax.Array:
    """[B] float: 1 for examples whose actions train, 0 for video-only ones (their action loss is masked).

    Batches without `has_actions` (e.g. from a latents cache) count an example as action-bearing when any
    of its actions is valid.
    """
    if "has_actions" in batch:
        return batch["has_actions"].astype(jnp.float32)
    return jnp.any(batch["action_mask"], axis=-1).astype(jnp.float32)


def example_rngs(rng: jax.Array, batch: int) -> jax.Array:
    """One key per example of the global batch, so an example's noise and times do not depend on micro-batching."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))


def _normal_per_example(rngs: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.vmap(lambda r: jax.random.normal(r, shape[1:], dtype))(rngs)


def loss_weights(
    spec: StepSpec, diffusion: ml_collections.ConfigDict, batch: dict[str, jax.Array], rngs: jax.Array,
    num_latent_frames: int,
) -> dict[str, jax.Array]:
    """Per-item weights of the losses: "video" [B, F] (0 on context frames and on examples whose video is
    held clean) and, in joint mode, "action" [B, T_a] (the action mask, 0 for video-only examples, for
    examples whose actions are held clean and on a clean action prefix), the draw of clean modalities ("clean",
    None when off) and of clean action prefixes ("action_prefix" [B, T_a], None when off).

    A clean modality is an input, not a target: its loss is not counted for that example (as in UVA and
    DreamZero). The draw is a function of the per-example keys, so micro-batches see the global batch's.
    """
    context = np.arange(num_latent_frames) < spec.clean_context_frames
    b = rngs.shape[0]
    clean = draw_clean_modalities(rngs, diffusion) if spec.mode == "joint" else None
    video = jnp.broadcast_to(jnp.asarray(~context, jnp.float32)[None], (b, num_latent_frames))
    if clean is not None:
        video = video * (~clean.video)[:, None]
    out = {"video": video, "clean": clean, "action_prefix": None}
    if spec.mode == "joint":
        action = batch["action_mask"].astype(jnp.float32) * example_has_actions(batch)[:, None]
        if clean is not None:
            action = action * (~clean.actions)[:, None]
        prefix = draw_action_prefix(rngs, diffusion, batch["action_mask"].shape[1])
        if prefix is not None:  # a clean prefix is an input, not a target
            action = action * ~prefix
        out["action"], out["action_prefix"] = action, prefix
    return out


def loss_normalizers(
    spec: StepSpec, diffusion: ml_collections.ConfigDict, batch: dict[str, jax.Array], rngs: jax.Array,
    num_latent_frames: int,
) -> dict[str, jax.Array]:
    """Denominators of the per-modality mean losses over the whole (global) batch.

    Micro-batches divide their sums by these, so their losses and gradients add up to the global batch's.
    """
    weights = loss_weights(spec, diffusion, batch, rngs, num_latent_frames)
    out = {"video": jnp.maximum(weights["video"].sum(), 1.0),
           "examples": jnp.asarray(rngs.shape[0], jnp.float32)}
    if spec.mode == "joint":
        out["action"] = jnp.maximum(weights["action"].sum(), 1.0)
    return out


def compute_loss(
    spec: StepSpec,
    diffusion: ml_collections.ConfigDict,
    params: Params,
    x0: jax.Array,
    batch: dict[str, jax.Array],
    rngs: jax.Array,
    normalizers: dict[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss per modality; the total is their weighted sum.

    `rngs` holds one key per example (`example_rngs`); `normalizers` (`loss_normalizers` of the global batch)
    default to this batch's own.
    """
    cfg = spec.model
    b, f = x0.shape[:2]
    if normalizers is None:
        normalizers = loss_normalizers(spec, diffusion, batch, rngs, f)
    weights = loss_weights(spec, diffusion, batch, rngs, f)
    clean = weights["clean"]  # per example: video clean (inverse dynamics) or actions clean (world model)
    keys = jax.vmap(lambda r: jax.random.split(r, 5))(rngs)
    rng_tv, rng_ta, rng_nv, rng_na, rng_drop = (keys[:, i] for i in range(5))
    frame_chunks = latent_frame_chunk(cfg, f)
    t_video = sample_chunk_times(rng_tv, frame_chunks, diffusion)
    context = np.arange(f) < spec.clean_context_frames
    t_video = jnp.where(context[None], 0.0, t_video)
    if clean is not None:
        t_video = jnp.where(clean.video[:, None], 0.0, t_video)
    noise = _normal_per_example(rng_nv, x0.shape, x0.dtype)
    xt = flow.add_noise(x0, noise, t_video)
    text = batch["text_embeddings"]
    keep_text = jax.vmap(lambda r: jax.random.bernoulli(r, 1.0 - diffusion.text_dropout, (1, 1)))(rng_drop)
    text = jnp.where(keep_text, text, 0.0)

    actions = t_action = noisy_actions = action_noise = proprio = None
    if spec.mode == "joint":
        actions = batch["actions"]
        action_chunks = frame_chunks[np.minimum(action_latent_frame(cfg, actions.shape[1]), f - 1)]
        if diffusion.independent_action_time:
            t_action = sample_chunk_times(rng_ta, action_chunks, diffusion, "action")
        else:
            t_action = t_video[:, np.minimum(action_latent_frame(cfg, actions.shape[1]), f - 1)]
        if clean is not None:
            t_action = jnp.where(clean.actions[:, None], 0.0, t_action)
        if weights["action_prefix"] is not None:
            t_action = jnp.where(weights["action_prefix"], 0.0, t_action)
        action_noise = _normal_per_example(rng_na, actions.shape, actions.dtype)
        noisy_actions = flow.add_noise(actions, action_noise, t_action)
        proprio = batch["proprio"]

    image = None
    # Teacher forcing: the clean clip (and clean actions) join the sequence as the history the noisy chunks
    # attend to; the loss stays on the noisy tokens, which are the outputs.
    history_latents = x0 if trains_teacher_forced(cfg) else None
    if cfg.image_conditioned:
        xt = i2v_model_input(xt, batch["condition_latents"])
        if history_latents is not None:
            history_latents = i2v_model_input(history_latents, batch["condition_latents"])
        image = batch["image_embeddings"]
    out = wam_forward(
        cfg, params, xt, flow.to_model_timestep(t_video), text,
        actions=noisy_actions, t_action=None if t_action is None else flow.to_model_timestep(t_action),
        proprio=proprio, image_embeddings=image, pad_to_multiple=spec.pad_to_multiple, history_latents=history_latents,
        history_actions=actions if history_latents is not None else None,
    )
    # Per latent frame, over every view and position: [B, F].
    video_err = jnp.mean(jnp.square(out.video - flow.velocity_target(x0, noise)), axis=tuple(range(2, x0.ndim)))
    loss_video = jnp.sum(video_err * weights["video"]) / normalizers["video"]
    metrics = {"loss_video": loss_video}
    loss = diffusion.video_loss_weight * loss_video
    if spec.mode == "joint":
        metrics["actions_share"] = jnp.sum(example_has_actions(batch)) / normalizers["examples"]
        action_sq = jnp.square(out.actions - flow.velocity_target(actions, action_noise))
        if "action_dim_mask" in batch:  # an embodiment padded into model.action_dim: only its own dimensions
            dims = batch["action_dim_mask"].astype(action_sq.dtype)[:, None, :]
            action_err = jnp.sum(action_sq * dims, axis=-1) / jnp.maximum(jnp.sum(dims, axis=-1), 1.0)
        else:
            action_err = jnp.mean(action_sq, axis=-1)
        loss_action = jnp.sum(action_err * weights["action"]) / normalizers["action"]
        metrics["loss_action"] = loss_action
        loss = loss + diffusion.action_loss_weight * loss_action
    metrics["loss"] = loss
    return loss, metrics


def check_microbatches(microbatches: int, batch_size: int, batch_shards: int = 1) -> None:
    """Raises a ValueError naming the keys unless the batch splits into equal, shardable micro-batches."""
    if microbatches < 1:
        raise ValueError(f"train.microbatches={microbatches}; expected 1 or more")
    if batch_size % microbatches:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by train.microbatches={microbatches}")
    if (batch_size // microbatches) % batch_shards:
        raise ValueError(
            f"a micro-batch of data.batch_size={batch_size} / train.microbatches={microbatches} = "
            f"{batch_size // microbatches} examples does not divide over the {batch_shards} devices the batch is "
            "sharded over (mesh.data x mesh.fsdp)"
        )


def _split_microbatches(tree: Any, microbatches: int) -> Any:
    """[B, ...] -> [M, B/M, ...], micro-batch m holding examples m, m+M, m+2M, ...

    Strided rather than contiguous, so every device's shard of the batch feeds every micro-batch and none
    has to move across the mesh.
    """
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def make_train_step(
    spec: StepSpec, diffusion: ml_collections.ConfigDict, tx: optax.GradientTransformation,
    schedule: optax.Schedule, ema_decay: float, stage_start_step: int = 0,
):
    """Returns the pure step `(state, batch, frozen_params) -> (state, metrics)`; frozen_params are the VAE's, or
    for an image-conditioned model {"vae": ..., "image_encoder": ...}."""
    check_diffusion_config(diffusion)
    m = spec.microbatches
    tx = optax.with_extra_args_support(tx)  # the update is given the loss (optim.skip_step_on_spike reads it)

    def latents_and_batch(batch, frozen_params):
        """Clean latents x0 of a (micro-)batch and the batch with any I2V conditioning added, all frozen."""
        if spec.model.image_conditioned:
            x0, conditioning = i2v_latents_and_conditioning(
                spec.vae, spec.image_encoder, frozen_params["vae"], frozen_params["image_encoder"], batch["frames"]
            )
            return x0, {**batch, **conditioning}
        if "latents" in batch:  # a latents cache stores them unnormalized
            return vae_lib.normalize_latents(spec.vae, batch["latents"].astype(jnp.float32)), batch
        return frames_to_latents(spec.vae, frozen_params, batch["frames"]), batch

    def trained_grads_and_metrics(params, is_train, batch, frozen_params, rngs, normalizers):
        """Loss gradients w.r.t. the trainable leaves of `params` (in flattened order) and the loss metrics."""
        x0, batch = latents_and_batch(batch, frozen_params)
        leaves, treedef = jax.tree.flatten(params)

        # Frozen leaves enter as constants: autodiff then never forms their weight-gradient matmuls, only the
        # activation gradients that flow through them to trainable parameters upstream.
        def loss_fn(trained_leaves):
            it = iter(trained_leaves)
            full = [next(it) if t else leaf for leaf, t in zip(leaves, is_train, strict=True)]
            return compute_loss(spec, diffusion, jax.tree.unflatten(treedef, full), x0, batch, rngs, normalizers)

        trained = [leaf for leaf, t in zip(leaves, is_train, strict=True) if t]
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        return grads, metrics

    def train_step(state: TrainState, batch: dict[str, jax.Array], frozen_params: Params):
        rng, step_rng = jax.random.split(state.rng)
        b = next(iter(batch.values())).shape[0]
        rngs = example_rngs(step_rng, b)
        vae_cfg = spec.vae
        num_frames = (batch["latents"].shape[1] if "latents" in batch
                      else vae_lib.latent_shape(vae_cfg, batch["frames"].shape)[1])
        normalizers = loss_normalizers(spec, diffusion, batch, rngs, num_frames)
        leaves, treedef = jax.tree.flatten(state.params)
        is_train = [label == "train" for label in jax.tree.leaves(trainable_labels(state.params, spec.trainable))]
        grads_of = functools.partial(trained_grads_and_metrics, state.params, is_train, frozen_params=frozen_params,
                                     normalizers=normalizers)
        if m == 1:
            trained_grads, metrics = grads_of(batch, rngs=rngs)
        else:
            check_microbatches(m, b)
            # Each micro-batch's loss is its share of the global mean, so the sums are the global batch's
            # loss and gradient; scan keeps one micro-batch's activations alive at a time.
            micro = _split_microbatches((batch, rngs), m)

            def body(acc, mb):
                out = grads_of(mb[0], rngs=mb[1])
                return jax.tree.map(jnp.add, acc, out), None

            shapes = jax.eval_shape(lambda mb: grads_of(mb[0], rngs=mb[1]), jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype), shapes)
            (trained_grads, metrics), _ = jax.lax.scan(body, zeros, micro)
        it = iter(trained_grads)
        grads = jax.tree.unflatten(
            treedef, [next(it) if t else jnp.zeros_like(leaf) for leaf, t in zip(leaves, is_train, strict=True)]
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=metrics["loss"])
        params = optax.apply_updates(state.params, updates)
        finite = opt_state.last_finite
        spike = spike_skipped(opt_state)
        if spike is not None:  # optim.skip_step_on_spike: the update was zero, and so is the EMA's
            finite = finite & jnp.logical_not(spike[0])
        ema = state.ema_params
        if ema is not None:
            new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
            ema = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_ema, ema)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step - stage_start_step)
        metrics["update_skipped"] = jnp.logical_not(finite).astype(jnp.int32)
        metrics["nonfinite_in_a_row"] = nonfinite_count(opt_state)
        if spike is not None:
            metrics["spike_skipped"] = spike[0].astype(jnp.int32)
            metrics["stage_spike_skips"] = spike[1]
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, rng=rng)
        return new_state, metrics

    return train_step
