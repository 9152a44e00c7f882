"""Compile-for-TPU from a CPU: the train state's layout needs no devices, the abstract batch is the loop's batch,
and `python -m wamjax.compile_check` reports a fit (exit 0) or the shortfall (exit 1) for real TPU topologies
described by libtpu. Each compile is of a few-token step, so it takes seconds."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import REPO, get_config, subprocess_env

from data_pipelines.sources.synthetic import make_synthetic_dataset
from wamjax import compile_check, compile_steps
from wamjax.models.config import model_config_from_run
from wamjax.models.text import TextEmbedder
from wamjax.models.wam import WorldActionModel, example_inputs
from wamjax.parallel.mesh import MESH_AXES, logical_rules, make_mesh
from wamjax.parallel.placement import device_batch, per_device_bytes
from wamjax.stages import stage_spec
from wamjax.train.optimizer import make_optimizer
from wamjax.train.setup import boxed_init_fn, state_layout


def _init_boxed(config):
    cfg = model_config_from_run(config)
    tx, _ = make_optimizer(config.optim, learning_rate=1e-3, warmup_steps=1, total_steps=10, trainable="all")
    example = jax.eval_shape(lambda: example_inputs(cfg, stage_spec(config, "video_pretrain").latent_shape, 8, 0))
    return boxed_init_fn(WorldActionModel(cfg), example, tx, use_ema=False)


def test_state_layout_on_an_abstract_mesh_and_a_topology_mesh_allocates_nothing():
    config = get_config("size=tiny,stage=video_pretrain")
    rules = logical_rules(config.mesh.rules)
    init_boxed = _init_boxed(config)
    abstract_mesh = jax.sharding.AbstractMesh((1, 4, 1, 1), MESH_AXES,
                                              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    topology_mesh = make_mesh(config.mesh, compile_steps.get_topology("v5p:2x2x1").devices)
    per_device = []
    for mesh in (abstract_mesh, topology_mesh):
        # Under the topology mesh an eager op would fail (no TPU here): the layout must be abstract throughout.
        mesh_context = jax.set_mesh(mesh) if isinstance(mesh, jax.sharding.Mesh) else contextlib.nullcontext()
        with mesh_context, nn.logical_axis_rules(list(rules)):
            abstract_state, _ = state_layout(init_boxed, mesh, rules)
        leaves = jax.tree.leaves(abstract_state)
        assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
        per_device.append(per_device_bytes(abstract_state))
    kernel = abstract_state.params["blocks"]["layers"]["block"]["attn1"]["to_q"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // 4  # embed over fsdp=4
    assert {d.platform for d in kernel.sharding.mesh.devices.flat} == {"tpu"}
    assert per_device[0] == per_device[1] > 0


def test_abstract_batch_is_the_batch_the_loop_feeds():
    config = get_config("size=tiny,stage=action_tune")
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh.rules)
    for chunk_frames in (0, 4):  # one state per clip, one per chunk of 4 frames
        config.data.proprio_chunk_frames = chunk_frames
        host = next(iter(make_synthetic_dataset(config.data)))
        real = device_batch(host, TextEmbedder(config.text, model_config_from_run(config).text_dim), mesh, rules)
        abstract = compile_steps.abstract_batch(stage_spec(config, "action_tune"), mesh, rules, latents=False)
        assert sorted(abstract) == sorted(real)
        for key, value in real.items():
            assert (abstract[key].shape, abstract[key].dtype) == (value.shape, value.dtype), key
            assert abstract[key].sharding.is_equivalent_to(value.sharding, value.ndim), key
    assert real["proprio"].shape == (config.data.batch_size, 3, config.data.proprio_dim)


def test_bad_topology_and_batch_are_named():
    with pytest.raises(compile_steps.CompileCheckError, match="v9x:2x2"):
        compile_steps.canonical_topology("v9x:2x2")
    with pytest.raises(compile_steps.CompileCheckError, match="3-D"):
        compile_steps.canonical_topology("v5p:2x2")
    assert compile_steps.canonical_topology("v5p-128") == ("v5p:4x4x4", "v5p", (4, 4, 4))
    config = get_config("size=tiny,stage=video_pretrain")
    config.data.batch_size = 6
    with pytest.raises(compile_steps.CompileCheckError, match=r"data.batch_size=6.*data x fsdp = 4"):
        compile_check.check(config, "v5p:2x2x1")
    config.data.batch_size, config.train.microbatches = 8, 4  # micro-batches of 2 over 4 chips
    with pytest.raises(compile_steps.CompileCheckError, match=r"train.microbatches=4 = 2 examples.*4 devices"):
        compile_check.check(config, "v5p:2x2x1", xla_flops=False)


def _compiled_on_cpu(config, stage):
    """The loop's step of `stage` compiled on this host's (simulated) devices, with its abstract arguments."""
    mesh = make_mesh(config.mesh)
    step, state, batch, frozen = compile_steps.abstract_train_step(config, stage, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(logical_rules(config.mesh.rules))):
        compiled = step.lower(state, batch, frozen).compile()
    return compiled, state, batch, frozen


def test_image_conditioned_step_compiles_with_its_image_encoder():
    config = get_config("size=tiny-i2v,stage=action_tune")
    config.data.batch_size = 8
    compiled, state, batch, frozen = _compiled_on_cpu(config, "action_tune")
    assert set(frozen) == {"vae", "image_encoder"}  # the CLIP tower runs frozen in the step, as in the loop
    assert state.params["patch_embedding"]["kernel"].shape[-2] == 36  # noisy + mask + conditioning channels
    assert compiled.cost_analysis()


def test_tokens_view_step_compiles_with_a_views_axis():
    config = get_config("size=tiny,stage=action_tune")
    config.data.cameras, config.data.view_layout = "primary,wrist", "tokens"
    compiled, state, batch, _ = _compiled_on_cpu(config, "action_tune")
    t, (h, w) = config.data.num_frames, config.data.resolution
    assert batch["frames"].shape == (config.data.batch_size, t, 2, h, w, 3)
    assert state.params["view_embedding"].shape[0] == 2
    assert compiled.cost_analysis()


def test_action_horizon_sets_the_compiled_actions_per_clip():
    config = get_config("size=tiny,stage=action_tune")
    config.data.frame_stride, config.data.action_horizon = 2, 8  # every dataset step's action: 2 per frame
    config.model.action_frames_per_latent = 8
    spec = stage_spec(config, "action_tune")
    assert spec.clip.actions == 16 != config.data.num_frames - 1
    _, _, batch, _ = _compiled_on_cpu(config, "action_tune")
    assert batch["actions"].shape == (config.data.batch_size, 16, 7)
    assert batch["action_mask"].shape == (config.data.batch_size, 16)
    # The policy's call samples the clip's 16 actions too (it sampled num_frames - 1 = 8).
    mesh = make_mesh(config.mesh)
    step, *args = compile_steps.abstract_policy_step(config, mesh, num_steps=1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(logical_rules(config.mesh.rules))):
        out = jax.eval_shape(step, *args)
    assert out.actions.shape == (1, 16, 7)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wamjax.compile_check", *args], env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _field(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


def test_tiny_train_step_fits_a_small_v5p_slice():
    # Unrolled layers: XLA's count is then the whole step, checked against the analytic one.
    out = _run(f"--config={REPO}/configs/wam.py:size=tiny,stage=video_pretrain", "--topology=v5p:2x2x1",
               "--config.data.latents_cache=latents", "--config.model.scan_layers=False")
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "(4 chips, TPU v5)" in text and "8 global = 2 per chip" in text
    total = _field(r"total\s+([\d.]+)\s+of 95 GiB", text)
    temporaries = _field(r"temporaries\s+([\d.]+)", text)
    assert 0 < temporaries <= total < 1.0
    assert 0.9 < _field(r"XLA / analytic = ([\d.]+)", text) < 1.2
    assert _field(r"step >= ([\d.]+) ms", text) > 0
    assert 0 < _field(r"MFU <= ([\d.]+)%", text) <= 100
    assert text.strip().endswith("result            fits")


def test_micro_batches_are_compiled_as_the_loop_runs_them():
    # Gradient accumulation over 2 micro-batches: XLA counts the scan's body once, the check scales it back.
    out = _run(f"--config={REPO}/configs/wam.py:size=tiny,stage=video_pretrain", "--topology=v5p:2x2x1",
               "--config.data.latents_cache=latents", "--config.model.scan_layers=False",
               "--config.train.microbatches=2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 global = 2 per chip" in out.stdout
    assert 0.9 < _field(r"XLA / analytic = ([\d.]+)", out.stdout) < 1.2


def test_splash_flops_are_not_taken_from_xla():
    # XLA's cost analysis counts nothing inside a Pallas kernel: with splash attention over 576 tokens its count
    # falls well under the analytic one, and the roofline falls back to the analytic FLOPs.
    out = _run(f"--config={REPO}/configs/wam.py:size=tiny,stage=video_pretrain", "--topology=v5p:2x2x1",
               "--config.data.latents_cache=latents", "--config.model.scan_layers=False",
               "--config.model.attention=splash", "--config.data.num_frames=33", "--config.data.resolution=(128,128)",
               "--config.data.batch_size=4")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _field(r"XLA / analytic = ([\d.]+)", out.stdout) < 0.7
    assert "XLA counts none of the Pallas attention kernel's FLOPs" in out.stdout
    assert 0 < _field(r"MFU <= ([\d.]+)%", out.stdout) <= 100


def test_step_that_cannot_fit_exits_1_with_the_shortfall():
    # Wan-1.3B's float32 parameters and Adam moments alone (~17 GB) exceed one v5e chip's 16 GiB.
    out = _run(f"--config={REPO}/configs/wam.py:size=wan1.3b,stage=video_pretrain", "--topology=v5e:1x1",
               "--config.data.latents_cache=latents", "--config.data.batch_size=1", "--config.data.num_frames=1",
               "--config.data.resolution=(16,16)", "--config.text.max_length=8", "--noxla_flops")
    assert out.returncode == 1, out.stdout + out.stderr
    needed = _field(r"does not fit: needs at least ([\d.]+) GiB per chip", out.stdout)
    assert needed > 16
    assert _field(r"arguments\s+([\d.]+)", out.stdout) == pytest.approx(
        3 * 4 * 1.42e9 / 2**30, rel=0.05)  # params + two moments in float32


def test_unknown_config_key_and_topology_exit_nonzero_naming_them():
    out = _run(f"--config={REPO}/configs/wam.py:size=tiny", "--topology=v5p:2x2x1", "--config.model.no_such_key=1")
    assert out.returncode != 0 and "no_such_key" in out.stderr
    out = _run(f"--config={REPO}/configs/wam.py:size=tiny", "--topology=v5p-7")
    assert out.returncode == 2 and "v5p-7" in out.stderr


@pytest.mark.parametrize("path,arg,frames", [
    ("configs/wam.py", "size=wan1.3b", 33),
    ("configs/wam.py", "size=wan14b,stage=action_tune", 33),
    ("configs/wan14b_video_pretrain.py", "", 81),
    ("configs/dreamzero_action_tune.py", "", 33),
])  # fmt: skip
def test_full_size_configs_default_to_the_fitting_layout(path, arg, frames):
    from wamjax import config_files

    module = config_files.load_config_module(f"{REPO}/configs/wam.py")
    config = config_files.get_config(f"{REPO}/{path}:{arg}" if arg else f"{REPO}/{path}")
    assert (config.model.dtype, config.model.remat_policy) == ("bfloat16", "full")
    assert config.model.attention == module.BIG_ATTENTION
    assert config.mesh.fsdp == -1 and config.data.num_frames == frames
    h, w = config.data.resolution
    assert config.data.latents_cache == f"latents/wan2.1_{frames}x{h}x{w}"
    tiny = config_files.get_config(f"{REPO}/{path}:size=tiny" + (f",{arg.split(',', 1)[1]}" if "," in arg else ""))
    assert tiny.data.latents_cache == "" and tiny.model.remat_policy == "none"


def test_offload_remat_policies_give_the_gradients_of_full_remat():
    from wamjax.models import wam
    from wamjax.models.config import SIZES, ModelConfig

    base = ModelConfig.from_dict(SIZES["tiny"])
    rng = np.random.default_rng(0)
    inputs = dict(latents=jnp.asarray(rng.standard_normal((2, 3, 4, 4, 16)), jnp.float32),
                  t_video=jnp.full((2,), 500.0), text_embeddings=jnp.asarray(rng.standard_normal((2, 8, 32)),
                                                                             jnp.float32))
    params = wam.init_params(base, jax.random.PRNGKey(0), (3, 4, 4, 16), 8)
    grads = {}
    for policy in ("full", "offload_block_inputs", "offload_dots_no_batch"):
        cfg = dataclasses.replace(base, remat_policy=policy)
        grads[policy] = jax.jit(jax.grad(lambda p, c=cfg: jnp.mean(wam.wam_forward(c, p, **inputs).video ** 2)))(
            params)
    for policy in ("offload_block_inputs", "offload_dots_no_batch"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[policy],
                     grads["full"])


def test_collective_traffic_reads_every_replica_group_format_and_async_starts():
    from wamjax.flops.collectives import collective_traffic

    hlo = "\n".join([
        "  %ag = f32[64,128]{1,0} all-gather(%p), channel_id=1, replica_groups=mesh['a'=4,'b'=2] {'a'}, "
        "dimensions={0}",
        "  %rs = bf16[8,128]{1,0} reduce-scatter(%g), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}",
        "  %ar = f32[100]{0} all-reduce(%x), replica_groups=[1,8]<=[8], to_apply=%add",
        "  %ars = f32[100]{0} all-reduce-start(%x), replica_groups={}, to_apply=%add",
        "  %ard = f32[100]{0} all-reduce-done(%ars)",
        "  %ags = (f32[16,128]{1,0}, f32[64,128]{1,0}) all-gather-start(%p), replica_groups=[2,4]<=[8], "
        "dimensions={0}",
        "  %cp = f32[10]{0} collective-permute(%y), source_target_pairs={{0,1},{1,0}}",
        "  %one = f32[10]{0} all-reduce(%z), replica_groups={{0},{1}}, to_apply=%add",
    ])
    traffic = collective_traffic(hlo, 8)
    assert traffic["all-gather"] == 2 * 64 * 128 * 4 * 3 / 4 * 2  # the mesh-axis group (4) and the async start
    assert traffic["reduce-scatter"] == 2 * (8 * 128 * 2 * 4) * 3 / 4  # the result is 1/n of the buffer
    assert traffic["all-reduce"] == 2 * 4 * 400 * 7 / 8  # two of 8 chips (iota and {} = all); not the done
    assert traffic["collective-permute"] == 2 * 40
    assert set(traffic) == {"all-gather", "reduce-scatter", "all-reduce", "collective-permute"}


def test_the_roofline_counts_the_collectives_of_the_compiled_step():
    config = get_config("size=tiny,stage=video_pretrain")
    config.data.latents_cache = "latents"
    scanned = compile_check.check(config, "v5p:2x2x1")  # the stack's collectives from 1- and 2-layer compiles
    config.model.scan_layers = False
    unrolled = compile_check.check(config, "v5p:2x2x1")
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(_init_boxed(config),
                                                                                 jax.random.key(0)).params))
    for report in (scanned, unrolled):
        traffic = report.collectives
        # Over 4 chips every float32 parameter is gathered and its gradient reduce-scattered (2 x 3/4 of its bytes
        # each), or, replicated, its gradient all-reduced (4 x 3/4): at least 2 x 2 x 3/4 of the bytes per chip.
        assert sum(traffic.values()) >= 2 * 2 * 0.75 * 4 * params
        assert traffic["all-gather"] > 0
        assert report.communication_time == pytest.approx(sum(traffic.values()) / 1200e9)
        out = report.to_json()
        assert out["communication_s"] > 0 and out["bound"] in ("compute", "memory", "communication")
        assert out["step_time_bound_s"] == max(out["compute_s"], out["memory_s"], out["communication_s"])
        assert "collectives       per chip" in report.format()
    assert sum(scanned.collectives.values()) == pytest.approx(sum(unrolled.collectives.values()), rel=0.2)
    single = compile_check.check(config, "v5e:1x1")
    assert single.collectives == {} and single.communication_time == 0.0 and single.bound_by != "communication"


def test_the_kv_cached_chunk_of_the_flash_config_compiles_with_its_latency_bound():
    """--what=inference on a chunk-causal policy: the KV-cached chunk with Flash, step caching and the CFG pair on
    two device groups (mesh.data=2), and the roofline chunk latency in the JSON."""
    flash = (f"--config={REPO}/configs/dreamzero_flash.py:size=tiny", "--topology=v5p:2x2x1", "--what=inference")
    out = _run(*flash, "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=-1", "--format=json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["fits"] and report["mesh"]["data"] == 2
    assert report["options"]["cfg_parallel"] == 2 and report["options"]["action_steps"] == 1
    # 4 video iterations (the action's one is the first) + the clean commit; the dynamic cache can skip 2.
    assert (report["forwards_per_chunk"], report["min_forwards_per_chunk"]) == (5, 3)
    assert report["forward_flops_per_chip"] > 0 and report["forward_bytes_per_chip"] > 0
    bound = report["forward_bound_s"] * 1e3
    assert report["chunk_latency_bound_ms"] == pytest.approx(5 * bound)
    assert report["chunk_latency_bound_min_ms"] == pytest.approx(3 * bound)
    # The CFG pair needs device groups of its own: on the training mesh it is refused, naming the keys.
    out = _run(*flash)
    assert out.returncode == 2 and "inference.cfg_parallel=2 under a mesh whose batch axes" in out.stderr
