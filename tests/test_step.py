"""The train step's work: micro-batches add up to the whole batch; frozen parameters cost no weight gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from train_utils import get_config

from wamjax.flops.stage import train_step_flops
from wamjax.models import vae as vae_lib
from wamjax.models.config import model_config_from_run
from wamjax.models.wam import WorldActionModel, example_inputs
from wamjax.parallel.mesh import batch_sharding, logical_rules, make_mesh
from wamjax.stages import stage_spec
from wamjax.train.optimizer import make_optimizer
from wamjax.train.setup import boxed_init_fn, jit_train_step, sharded_init
from wamjax.train.step import StepSpec, check_microbatches, make_train_step

BATCH = 8
LATENT_SHAPE = (3, 4, 4, 16)
NUM_ACTIONS = 8
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _host_batch(cfg) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((BATCH, NUM_ACTIONS), bool)
    mask[1, -3:] = False  # padded chunk ends in two examples: micro-batches hold different action counts
    mask[6, -5:] = False
    return {
        "latents": rng.standard_normal((BATCH, *LATENT_SHAPE)).astype(np.float32),
        "text_embeddings": rng.standard_normal((BATCH, 8, cfg.text_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (BATCH, NUM_ACTIONS, cfg.action_dim)).astype(np.float32),
        "proprio": rng.uniform(-1, 1, (BATCH, cfg.proprio_dim)).astype(np.float32),
        "action_mask": mask,
    }


# A wider tiny model for FLOP comparisons: at the tiny size's width (48) elementwise work, which XLA counts
# and the analytic (matmul) count leaves out, is a large share of the step.
WIDE = {"attention_head_dim": 64, "ffn_dim": 512}


def _setup(devices: int, tx: optax.GradientTransformation, scan_layers: bool = True, model: dict | None = None,
           **spec_kwargs):
    config = get_config("size=tiny,stage=action_tune")
    config.model.update(model or {})
    config.mesh.data, config.mesh.fsdp = 1, devices
    config.model.scan_layers = scan_layers
    cfg = model_config_from_run(config)
    mesh = make_mesh(config.mesh, jax.devices()[:devices])
    rules = logical_rules(config.mesh.rules)
    model = WorldActionModel(cfg)
    example = example_inputs(cfg, LATENT_SHAPE, config.text.max_length, NUM_ACTIONS)
    spec = StepSpec(model=cfg, mode="joint", clean_context_frames=0, vae=vae_lib.vae_config_for("tiny"),
                    **spec_kwargs)
    step_fn = make_train_step(spec, config.diffusion, tx, optax.constant_schedule(1e-2), 0.0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        init = sharded_init(boxed_init_fn(model, example, tx, use_ema=False), mesh, rules,
                            compiler_options=FAST_COMPILE)
    batch = {k: jax.device_put(v, batch_sharding(mesh, rules, v.ndim)) for k, v in _host_batch(cfg).items()}
    return config, mesh, rules, init, step_fn, batch


def test_four_microbatches_of_two_equal_one_batch_of_eight():
    # Plain SGD: equal updated parameters mean equal gradients (Adam's first step would amplify rounding).
    tx = optax.apply_if_finite(optax.sgd(1e-2), max_consecutive_errors=5)
    results = []
    for microbatches in (1, 4):
        _, mesh, rules, init, step_fn, batch = _setup(2, tx, microbatches=microbatches)
        with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
            state = init.init(jax.random.PRNGKey(0))
            step = jit_train_step(step_fn, init.shardings, compiler_options=FAST_COMPILE)
            state, metrics = step(state, batch, None)
            results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (whole, whole_metrics), (split, split_metrics) = results
    for key in ("loss", "loss_video", "loss_action", "grad_norm"):
        np.testing.assert_allclose(split_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert whole_metrics["loss_action"] > 0 and np.isfinite(whole_metrics["loss"])


def test_microbatches_that_do_not_divide_the_batch_name_the_keys():
    with pytest.raises(ValueError, match=r"data.batch_size=8 is not divisible by train.microbatches=3"):
        check_microbatches(3, 8)
    with pytest.raises(ValueError, match=r"train.microbatches=4 = 2 examples .* 8 devices .*mesh.data x mesh.fsdp"):
        check_microbatches(4, 8, batch_shards=8)
    with pytest.raises(ValueError, match=r"train.microbatches=0"):
        check_microbatches(0, 8)
    check_microbatches(4, 8, batch_shards=2)


def _compiled_step_flops(trainable: str) -> float:
    config = get_config("size=tiny,stage=action_tune")
    tx, schedule = make_optimizer(config.optim, learning_rate=1e-3, warmup_steps=0, total_steps=10,
                                  trainable=trainable)
    # Unrolled blocks: XLA's cost analysis counts a scanned (while-loop) body once.
    _, mesh, rules, init, step_fn, batch = _setup(1, tx, scan_layers=False, model=WIDE, trainable=trainable)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        compiled = jit_train_step(step_fn, init.shardings, compiler_options=FAST_COMPILE).lower(
            init.abstract_state, batch, None).compile()
    return float(compiled.cost_analysis()["flops"])


def test_frozen_parameters_get_no_weight_gradient_matmuls():
    full = _compiled_step_flops("all")
    actions = _compiled_step_flops("actions")
    # Freezing the backbone drops its weight gradients: about a third of the step.
    assert actions < 0.8 * full, (actions, full)
    config = get_config("size=tiny,stage=action_tune")
    config.model.update(WIDE)
    config.data.batch_size = BATCH
    config.stages.action_tune.trainable = "actions"
    analytic_actions = train_step_flops(stage_spec(config, "action_tune")).train_per_step
    config.stages.action_tune.trainable = "all"
    analytic_full = train_step_flops(stage_spec(config, "action_tune")).train_per_step
    # The analytic count drops by what XLA's drops (XLA's totals also hold the loss, noise, optimizer and the
    # elementwise work that the backward pass recomputes; 11% apart at this width).
    assert analytic_full - analytic_actions == pytest.approx(full - actions, rel=0.15)
