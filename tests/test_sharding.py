"""One train step gives the same loss and parameters on every mesh, and parameters land where the rules say."""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from wamjax import config_files
from wamjax.models import vae as vae_lib
from wamjax.models.config import model_config_from_run
from wamjax.models.wam import WorldActionModel, example_inputs
from wamjax.parallel.mesh import MESH_AXES, batch_sharding, logical_rules, make_mesh
from wamjax.parallel.placement import PlacementError, check_placement, per_device_bytes
from wamjax.train.optimizer import make_optimizer
from wamjax.train.setup import boxed_init_fn, jit_train_step, sharded_init, state_shardings, unbox_plain
from wamjax.train.step import StepSpec, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str):
    return config_files.get_config(f"{os.path.join(REPO, 'configs', 'wam.py')}:{arg}")


# (data, fsdp, tensor, sequence)
MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 1, 1)]
BATCH = 8
LATENT_SHAPE = (3, 4, 4, 16)  # 12 video tokens; joint mode adds 8 action tokens + 1 proprio token = 21
NUM_ACTIONS = 8
# Plain SGD, so equal updated parameters mean equal gradients. Adam's first update is lr * sign(grad), which
# turns float32 rounding noise in near-zero gradients into full steps of either sign; the AdamW path is
# compared over 5 steps by tests/test_multiprocess.py.
LEARNING_RATE = 1e-2
# XLA's CPU backend spends most of this file's time compiling; its unoptimized code is plenty fast here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _config(mesh_shape: tuple[int, int, int, int], model: tuple = ()):
    config = get_config("size=tiny,stage=video_pretrain")
    with config.unlocked():
        for axis, size in zip(("data", "fsdp", "tensor", "sequence"), mesh_shape, strict=True):
            config.mesh[axis] = size
        config.diffusion.text_dropout = 0.0
        for key, value in model:
            config.model[key] = value
    return config


def _host_batch(mode: str, cfg) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    batch = {
        "latents": rng.standard_normal((BATCH, *LATENT_SHAPE)).astype(np.float32),
        "text_embeddings": rng.standard_normal((BATCH, 8, cfg.text_dim)).astype(np.float32),
    }
    if mode == "joint":
        batch["actions"] = rng.uniform(-1, 1, (BATCH, NUM_ACTIONS, cfg.action_dim)).astype(np.float32)
        batch["proprio"] = rng.uniform(-1, 1, (BATCH, cfg.proprio_dim)).astype(np.float32)
        mask = np.ones((BATCH, NUM_ACTIONS), bool)
        mask[0, -3:] = False  # a padded action chunk end
        batch["action_mask"] = mask
    return batch


@dataclasses.dataclass
class StepResult:
    mesh: jax.sharding.Mesh
    metrics: dict
    params: dict  # host copies after one step
    param_shard_shapes: dict  # keystr -> per-device shard shape of the updated params
    state_bytes_per_device: int
    hlo: str  # the compiled step


def _setup(mesh_shape: tuple[int, int, int, int], mode: str, model: tuple = (), pad: int | None = None):
    """Mesh, rules, optimizer, state layout and step, built as the training loop builds them; `model` holds
    (key, value) overrides of the model config, `pad` the token multiple (default: the sequence axis)."""
    config = _config(mesh_shape, model)
    cfg = model_config_from_run(config)
    mesh = make_mesh(config.mesh, jax.devices()[: int(np.prod(mesh_shape))])
    rules = logical_rules(config.mesh.rules)
    num_actions = NUM_ACTIONS if mode == "joint" else 0
    # apply_if_finite keeps the optimizer state the step reads (last_finite, notfinite_count).
    tx = optax.apply_if_finite(optax.sgd(LEARNING_RATE), max_consecutive_errors=5)
    schedule = optax.constant_schedule(LEARNING_RATE)
    pad = mesh.shape["sequence"] if pad is None else pad
    model = WorldActionModel(cfg, pad_to_multiple=pad)
    example = example_inputs(cfg, LATENT_SHAPE, config.text.max_length, num_actions)
    spec = StepSpec(model=cfg, mode=mode, clean_context_frames=0, vae=vae_lib.vae_config_for("tiny"),
                    pad_to_multiple=pad)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        init = sharded_init(boxed_init_fn(model, example, tx, use_ema=False), mesh, rules,
                            compiler_options=FAST_COMPILE)
    step_fn = make_train_step(spec, config.diffusion, tx, schedule, 0.0)
    return cfg, mesh, rules, init, step_fn


@functools.cache
def _initial_state(mode: str, model: tuple = ()):
    """The freshly initialized state on one device, as host arrays (each mesh starts from these values)."""
    _, mesh, rules, init, _ = _setup((1, 1, 1, 1), mode, model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        return jax.device_get(init.init(jax.random.PRNGKey(0)))


@functools.cache
def _result(mesh_shape: tuple[int, int, int, int], mode: str, model: tuple = (), pad: int | None = None
            ) -> StepResult:
    """One train step on the first prod(mesh_shape) devices, from the common initial state."""
    cfg, mesh, rules, init, step_fn = _setup(mesh_shape, mode, model, pad)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        state = jax.device_put(_initial_state(mode, model), init.shardings)
        check_placement(state.params, init.shardings.params, mesh, log=lambda _: None)
        step = jit_train_step(step_fn, init.shardings, compiler_options=FAST_COMPILE)
        batch = {k: jax.device_put(v, batch_sharding(mesh, rules, v.ndim)) for k, v in _host_batch(mode, cfg).items()}
        compiled = step.lower(state, batch, None).compile()
        new_state, metrics = compiled(state, batch, None)
    flat = jax.tree_util.tree_flatten_with_path(new_state.params)[0]
    return StepResult(
        mesh=mesh,
        metrics={k: float(v) for k, v in jax.device_get(metrics).items()},
        params=jax.device_get(new_state.params),
        param_shard_shapes={jax.tree_util.keystr(p): v.sharding.shard_shape(v.shape) for p, v in flat},
        state_bytes_per_device=per_device_bytes((new_state.params, new_state.opt_state)),
        hlo=compiled.as_text(),
    )


def _assert_same_step(result: StepResult, reference: StepResult, mode: str, initial) -> None:
    for key in ("loss", "loss_video", "grad_norm") + (("loss_action",) if mode == "joint" else ()):
        np.testing.assert_allclose(result.metrics[key], reference.metrics[key], rtol=2e-5, err_msg=key)
    assert result.metrics["update_skipped"] == 0
    # The step must have moved the parameters, or equal parameters would prove nothing.
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), reference.params, initial.params)
    assert max(jax.tree.leaves(moved)) > 1e-3
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)),
        result.params, reference.params,
    )


@pytest.mark.parametrize("mode", ["video", "joint"])
@pytest.mark.parametrize("mesh_shape", MESHES[:-1], ids=lambda s: "x".join(map(str, s)))
def test_one_step_matches_single_device(mesh_shape, mode):
    reference = _result((1, 1, 1, 1), mode)
    result = _result(mesh_shape, mode)
    assert result.mesh.size == int(np.prod(mesh_shape))
    _assert_same_step(result, reference, mode, _initial_state(mode))


# 4 heads, so sequence=4 can take them; the blockwise kernel, so no device ever holds [S, S].
CONTEXT_PARALLEL_MODEL = (("num_attention_heads", 4), ("attention_head_dim", 12), ("attention", "blockwise"),
                          ("attention_block_q", 8), ("attention_block_kv", 8))


@pytest.mark.parametrize("mode", ["video", "joint"])
def test_context_parallel_step_matches_fsdp(mode):
    # (fsdp=2, sequence=4) against (fsdp=8). Tokens pad to a multiple of 8 (video 12 -> 16, joint 21 -> 24),
    # so both modes carry padding that valid tokens must not see.
    reference = _result((1, 8, 1, 1), mode, CONTEXT_PARALLEL_MODEL)
    result = _result((1, 2, 1, 4), mode, CONTEXT_PARALLEL_MODEL, pad=8)
    _assert_same_step(result, reference, mode, _initial_state(mode, CONTEXT_PARALLEL_MODEL))
    # Attention moved the sequence axis onto the heads and back instead of gathering keys and values...
    assert "all-to-all" in result.hlo
    # ...and parameters plus optimizer state shard over fsdp x sequence: no more per device than fsdp=8.
    assert result.state_bytes_per_device <= reference.state_bytes_per_device * 1.05
    key = "['blocks']['layers']['block']['attn1']['to_q']['kernel']"  # (layers, embed, heads)
    assert result.param_shard_shapes[key] == reference.param_shard_shapes[key]


def test_fsdp_shards_attention_kernel_and_optimizer_state():
    result = _result((1, 8, 1, 1), "video")
    single = _result((1, 1, 1, 1), "video")
    key = "['blocks']['layers']['block']['attn1']['to_q']['kernel']"  # (layers, embed, heads)
    full = single.param_shard_shapes[key]
    assert result.param_shard_shapes[key] == (full[0], full[1] // 8, full[2])
    # FSDP over 8 devices: parameters (and SGD's empty state) per device shrink close to 1/8.
    ratio = result.state_bytes_per_device / single.state_bytes_per_device
    assert 1 / 8 <= ratio < 1 / 8 * 1.3, ratio


def test_tensor_axis_shards_heads_and_mlp():
    result = _result((2, 2, 2, 1), "video")
    single = _result((1, 1, 1, 1), "video")
    for key, dims in (("['blocks']['layers']['block']['attn1']['to_q']['kernel']", (1, 2, 2)),
                      ("['blocks']['layers']['block']['ffn']['proj_in']['kernel']", (1, 2, 2)),
                      ("['blocks']['layers']['block']['ffn']['proj_out']['kernel']", (1, 2, 2))):
        full = single.param_shard_shapes[key]
        assert result.param_shard_shapes[key] == tuple(n // d for n, d in zip(full, dims, strict=True)), key


def test_sharded_init_creates_parameters_in_their_shards():
    # The loop's path: parameters and Adam moments are created directly in their shards, with the same values
    # as on one device (so a run's start does not depend on its mesh).
    _, mesh, rules, init, _ = _setup((1, 8, 1, 1), "video")
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        state = init.init(jax.random.PRNGKey(0))
    kernel = state.params["blocks"]["layers"]["block"]["attn1"]["to_q"]["kernel"]  # (layers, embed, heads)
    assert kernel.sharding.shard_shape(kernel.shape) == (kernel.shape[0], kernel.shape[1] // 8, kernel.shape[2])
    assert {d.id for d in kernel.sharding.device_set} == {d.id for d in jax.devices()}
    assert kernel.sharding.spec == init.shardings.params["blocks"]["layers"]["block"]["attn1"]["to_q"]["kernel"].spec
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params,
                 _initial_state("video").params)


def test_action_and_proprio_tokens_shard_along_sequence_with_padding():
    # 12 video + 8 action + 1 proprio = 21 tokens; sequence=2 pads to 22 (the pad masked in attention) and
    # each device holds 11 of them: action and proprio tokens are split like video tokens, not replicated.
    mesh_shape = (1, 2, 2, 2)
    cfg, mesh, rules, init, _ = _setup(mesh_shape, "joint")
    model = WorldActionModel(cfg, pad_to_multiple=mesh.shape["sequence"])
    host = _host_batch("joint", cfg)
    t = np.full((BATCH,), 500.0, np.float32)
    inputs = dict(latents=host["latents"], t_video=t, text_embeddings=host["text_embeddings"],
                  actions=host["actions"], t_action=t, proprio=host["proprio"])

    def forward(params, inputs):
        _, state = model.apply({"params": params}, **inputs, capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]["blocks"]["__call__"][0]

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        params = jax.device_put(_initial_state("joint").params, init.shardings.params)
        inputs = {k: jax.device_put(x, batch_sharding(mesh, rules, x.ndim)) for k, x in inputs.items()}
        tokens = jax.jit(forward, compiler_options=FAST_COMPILE)(params, inputs)
    assert tokens.shape == (BATCH, 22, cfg.dim)
    # batch over data x fsdp = 2, tokens over sequence = 2; embed whole (fsdp is taken by the batch).
    assert tokens.sharding.shard_shape(tokens.shape) == (BATCH // 2, 11, cfg.dim)


def test_check_placement_rejects_replicated_large_tensor():
    mesh = make_mesh(_config((1, 8, 1, 1)).mesh)
    intended = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    big = jax.device_put(np.zeros((512, 1024), np.float32), jax.sharding.NamedSharding(mesh,
                                                                                       jax.sharding.PartitionSpec()))
    with pytest.raises(PlacementError, match=r"\['kernel'\].*replicated"):
        check_placement({"kernel": big}, {"kernel": intended}, mesh, log=lambda _: None)
    sharded = jax.device_put(big, intended)
    assert check_placement({"kernel": sharded}, {"kernel": intended}, mesh, log=lambda _: None) == 512 * 1024 * 4 // 8


@pytest.mark.parametrize("size", ["wan1.3b", "wan14b"])
def test_fsdp_divides_full_size_state_by_n(size):
    # Abstract only: the real sizes' train state laid out by the default rules on a 256-way FSDP AbstractMesh.
    config = get_config(f"size={size},stage=video_pretrain")
    cfg = model_config_from_run(config)
    tx, _ = make_optimizer(config.optim, learning_rate=1e-4, warmup_steps=0, total_steps=10, trainable="all")
    init_boxed = boxed_init_fn(WorldActionModel(cfg), example_inputs(cfg, (1, 4, 4, 16), 4), tx, use_ema=False)
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    rules = logical_rules(config.mesh.rules)

    def state_bytes(fsdp: int) -> int:
        mesh = jax.sharding.AbstractMesh((1, fsdp, 1, 1), MESH_AXES,
                                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
        shardings = jax.tree.leaves(state_shardings(abstract_boxed, mesh, rules),
                                    is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        leaves = jax.tree.leaves(unbox_plain(abstract_boxed))
        return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                   for a, s in zip(leaves, shardings, strict=True))

    full = state_bytes(1)
    assert full > 3 * 4 * 1e9  # params + two Adam moments in float32
    for fsdp in (8, 256):
        assert state_bytes(fsdp) * fsdp == pytest.approx(full, rel=0.05), fsdp
