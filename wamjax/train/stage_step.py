"""The train step of one stage, built from its spec: what the loop runs and what `wamjax.compile_check` compiles.

Call `build_stage_step` under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` (see `train.setup`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from wamjax.models.wam import WorldActionModel, example_inputs
from wamjax.parallel.mesh import batch_sharding
from wamjax.stages import StageSpec
from wamjax.train.optimizer import make_optimizer
from wamjax.train.setup import boxed_init_fn
from wamjax.train.step import StepSpec, TrainState, check_microbatches, make_train_step


@dataclasses.dataclass(frozen=True)
class StageStep:
    """A stage's model, optimizer and pure step, with the initializer of its train state."""

    model: WorldActionModel
    example: dict[str, jax.ShapeDtypeStruct]  # the model inputs' shapes by argument name (init reads no values)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step_spec: StepSpec
    step_fn: Callable  # (state, batch, frozen_params) -> (state, metrics); jit with `train.setup.jit_train_step`
    init_boxed: Callable[[jax.Array], TrainState]  # rng -> boxed state; lay out with `train.setup.sharded_init`


def build_stage_step(spec: StageSpec, mesh: jax.sharding.Mesh, rules: Any, *, total_steps: int,
                     stage_start_step: int = 0) -> StageStep:
    """The step of `spec`'s stage on `mesh`: its optimizer schedule runs over `total_steps` (what the budget buys
    of the configured steps) and its per-stage counters start at global step `stage_start_step`."""
    batch = spec.clip.batch_size
    check_microbatches(spec.microbatches, batch, batch // batch_sharding(mesh, rules, 1).shard_shape((batch,))[0])
    opt = spec.optimizer
    tx, schedule = make_optimizer(opt.optim, learning_rate=opt.learning_rate, warmup_steps=opt.warmup_steps,
                                  total_steps=total_steps, trainable=opt.trainable)
    pad = int(mesh.shape["sequence"])
    model = WorldActionModel(spec.model, pad_to_multiple=pad)
    latent_shape = spec.latent_shape
    example = jax.eval_shape(lambda: example_inputs(spec.model, latent_shape, spec.text_length, spec.action_tokens))
    step_spec = StepSpec(model=spec.model, mode=spec.mode, clean_context_frames=spec.clean_context_frames,
                         vae=spec.vae, pad_to_multiple=pad, image_encoder=spec.image_encoder,
                         microbatches=spec.microbatches, trainable=opt.trainable)
    step_fn = make_train_step(step_spec, spec.diffusion, tx, schedule, opt.ema_decay, stage_start_step)
    init_boxed = boxed_init_fn(model, example, tx, opt.ema_decay > 0)
    return StageStep(model=model, example=dict(example), tx=tx, schedule=schedule, step_spec=step_spec,
                     step_fn=step_fn, init_boxed=init_boxed)


def frozen_params(vae_params: Any, image_encoder_params: Any = None) -> Any:
    """The step's frozen parameters: the VAE's, or for an image-conditioned model the VAE's and the CLIP tower's."""
    if image_encoder_params is None:
        return vae_params
    return {"vae": vae_params, "image_encoder": image_encoder_params}
