"""The real trainer on the tiny model: losses fall, stages chain, frozen parameters stay put, faults are handled."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from checkpoint_utils import restore_state_tree
from train_utils import REPO, get_config, metrics_rows, run_main, subprocess_env

from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import load_checkpoint
from wamjax.flops.stage import train_step_flops
from wamjax.stages import stage_spec
from wamjax.train import guards as guards_lib
from wamjax.train.guards import NumericalFault
from wamjax.train.loop import train
from wamjax.train.optimizer import learning_rate_schedule


def _tiny(arg: str, steps: int, **overrides) -> object:
    config = get_config(arg)
    config.train.steps = steps
    config.train.log_every = 5
    config.checkpoint.async_save = False
    config.checkpoint.every_steps = 25
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    """One `stage=all` run, 30 steps per stage, on the 8 simulated devices (fsdp=8)."""
    workdir = str(tmp_path_factory.mktemp("two_stage"))
    results = train(_tiny("size=tiny,stage=all", 30), workdir)
    return workdir, results


def _mean_loss(rows, key):
    return float(np.mean([r[key] for r in rows]))


def test_loss_falls_in_both_modes(two_stage_run):
    workdir, results = two_stage_run
    assert [r.name for r in results] == ["video_pretrain", "action_tune"]
    rows = metrics_rows(workdir)
    video = [r for r in rows if r["stage"] == "video_pretrain"]
    joint = [r for r in rows if r["stage"] == "action_tune"]
    assert [r["step"] for r in video] == list(range(5, 31, 5))
    assert [r["step"] for r in joint] == list(range(35, 61, 5))
    assert _mean_loss(video[-3:], "loss_video") < 0.8 * _mean_loss(video[:2], "loss_video")
    assert "loss_action" not in video[0]
    assert _mean_loss(joint[-3:], "loss_action") < 0.8 * _mean_loss(joint[:2], "loss_action")
    required = {"step", "stage", "loss", "loss_video", "learning_rate", "step_time_s", "examples_per_s",
                "tokens_per_s", "stage_flops", "budget_fraction", "mfu"}
    assert required <= set(joint[0])
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_unknown_config_key_is_named_before_compile(tmp_path):
    proc = run_main(str(tmp_path), "size=tiny", "--config.train.stepz=3", timeout=120)
    assert proc.returncode != 0
    assert "stepz" in proc.stderr
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_checkpoint_restores_onto_other_meshes(two_stage_run):
    """Saved on 8 devices with fsdp=8; restored on (2,2,2,1) and on one device with identical values."""
    workdir, _ = two_stage_run
    step_dir = os.path.join(ckpt.checkpoint_dir(workdir), "60")
    _, reference = load_checkpoint(step_dir, use_ema=False)
    saved = restore_state_tree(step_dir)
    for shape, devices in (((2, 2, 2, 1), jax.devices()), ((1, 1, 1, 1), jax.devices()[:1])):
        mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor", "sequence"), devices=devices,
                             axis_types=(jax.sharding.AxisType.Auto,) * 4)
        # Shard every parameter's leading axis over fsdp where it divides, else replicate.
        def target(x, mesh=mesh):
            spec = ("fsdp",) if x.ndim and x.shape[0] % mesh.shape["fsdp"] == 0 else ()
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        abstract = jax.tree.map(target, saved)
        restored = restore_state_tree(step_dir, abstract)
        for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(reference), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
        leaf = restored["params"]["blocks"]["layers"]["block"]["attn1"]["to_q"]["kernel"]
        assert len(leaf.sharding.device_set) == mesh.size


def test_action_tune_from_checkpoint_freezes_backbone(two_stage_run, tmp_path):
    workdir, _ = two_stage_run
    source = os.path.join(ckpt.checkpoint_dir(workdir), "30")  # the end of video pretraining
    config = _tiny("size=tiny,stage=action_tune", 4)
    config.stages.action_tune.init_from = source
    config.stages.action_tune.trainable = "actions"
    config.stages.action_tune.learning_rate = 1e-2
    train(config, str(tmp_path))
    _, before = load_checkpoint(source, use_ema=False)
    _, after = load_checkpoint(os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "4"), use_ema=False)
    for key in before:
        for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key]), strict=True):
            np.testing.assert_array_equal(a, b)  # frozen: bit-identical to the video checkpoint
    moved = [np.abs(a).sum() for a in jax.tree.leaves(after["actions"])]
    assert len(moved) > 5 and all(np.isfinite(moved))
    rows = metrics_rows(str(tmp_path))
    assert rows[-1]["step"] == 4 and rows[-1]["stage"] == "action_tune"


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    # An absurd learning rate blows the parameters up; every later update is non-finite and skipped.
    config = _tiny("size=tiny,stage=video_pretrain", 30, **{"optim.learning_rate": 1e12, "optim.grad_clip": 0.0,
                                                            "optim.max_consecutive_nonfinite": 2})
    config.train.log_every = 1
    config.checkpoint.every_steps = 1
    with pytest.raises(NumericalFault, match=r"step \d+: 3 non-finite steps in a row"):
        train(config, str(tmp_path))
    rows = metrics_rows(str(tmp_path))
    skipped = [r for r in rows if r["update_skipped"]]
    assert len(skipped) == 2
    latest = ckpt.make_manager(str(tmp_path), config.checkpoint).latest_step()
    state = restore_state_tree(os.path.join(ckpt.checkpoint_dir(str(tmp_path)), str(latest)))
    # Skipped updates left the parameters exactly as the last applied update made them.
    _, params = load_checkpoint(os.path.join(ckpt.checkpoint_dir(str(tmp_path)), str(latest - 1)), use_ema=False)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_i2v_action_tune_trains_and_checkpoints(tmp_path):
    """Wan2.1-I2V conditioning in the step: first-frame latents + mask channels, CLIP tokens from a frozen tower."""
    from wamjax.flops.stage import frozen_flops

    config = _tiny("size=tiny-i2v,stage=action_tune", 2, **{"train.log_every": 1, "checkpoint.every_steps": 2})
    workdir = str(tmp_path / "i2v")
    train(config, workdir)
    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss_video"]) and np.isfinite(r["loss_action"]) for r in rows)
    frozen = frozen_flops(stage_spec(config, config.stage))
    assert frozen["image_encoder"] > 0 and frozen["vae_condition_encoder"] == frozen["vae_encoder"] > 0
    assert rows[-1]["frozen_flops_per_step"] == sum(frozen.values())
    run_config, params = load_checkpoint(os.path.join(workdir, "checkpoints", "2"))
    assert run_config.model.image_dim == 32
    block = params["blocks"]["layers"]["block"]
    assert block["attn2"]["add_k_proj"]["kernel"].shape == (2, 48, 48)
    assert params["patch_embedding"]["kernel"].shape[3] == 36  # 16 noisy + 4 mask + 16 conditioning channels


def test_loop_reads_the_device_on_log_and_checkpoint_steps_only(tmp_path, monkeypatch):
    """Metrics stay on device between log steps; the deferred non-finite check still names the exact step."""
    real_device_get = jax.device_get
    loop_fetches = []

    def counting_device_get(tree):
        if sys._getframe(1).f_code.co_filename == guards_lib.__file__:
            loop_fetches.append(tree)
        return real_device_get(tree)

    monkeypatch.setattr(jax, "device_get", counting_device_get)
    config = _tiny("size=tiny,stage=video_pretrain", 30, **{"optim.learning_rate": 1e12, "optim.grad_clip": 0.0,
                                                            "optim.max_consecutive_nonfinite": 2})
    config.train.log_every = 4
    config.checkpoint.every_steps = 4
    with pytest.raises(NumericalFault, match=r"step \d+: 3 non-finite steps in a row") as fault:
        train(config, str(tmp_path))
    fault_step = int(re.search(r"step (\d+):", str(fault.value)).group(1))
    assert fault_step >= 3
    # Today's loop read every step; now one transfer per log/checkpoint step, the last one finding the fault.
    assert len(loop_fetches) == -(-fault_step // 4) < fault_step
    assert [r["step"] for r in metrics_rows(str(tmp_path))] == list(range(4, fault_step, 4))
    latest = ckpt.make_manager(str(tmp_path), config.checkpoint).latest_step()
    assert latest == 4 * ((fault_step - 1) // 4)  # nothing was saved at or past the faulty step


def test_budget_cut_stage_runs_the_estimated_steps_on_a_schedule_built_for_them(tmp_path):
    config = _tiny("size=tiny,stage=video_pretrain", 20, **{"optim.warmup_steps": 1})
    config.train.log_every = 1
    step_flops = train_step_flops(stage_spec(config, "video_pretrain")).train_per_step
    config.stages.video_pretrain.budget_flops = 7 * step_flops  # an exact multiple buys all 7 steps
    est = subprocess.run(
        [sys.executable, "-m", "wamjax.flops.estimate",
         f"--config={REPO}/configs/wam.py:size=tiny,stage=video_pretrain",
         "--config.train.steps=20", f"--config.stages.video_pretrain.budget_flops={7 * step_flops!r}",
         "--format=json"], env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, check=True)
    estimate = json.loads(est.stdout)
    assert (estimate["stage_steps"], estimate["budget_limited"], estimate["configured_steps"]) == (7, True, 20)

    (result,) = train(config, str(tmp_path))
    assert (result.final_step, result.reason) == (estimate["stage_steps"], "budget")
    rows = metrics_rows(str(tmp_path))
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert rows[-1]["stage_flops"] <= config.stages.video_pretrain.budget_flops
    # The schedule spans the 7 steps the budget buys, not the 20 configured: the last step's learning rate
    # is one step from the cosine floor, which the next step (not bought) would reach.
    peak, floor = config.optim.learning_rate, config.optim.learning_rate * config.optim.min_lr_ratio
    schedule = learning_rate_schedule(peak, 1, 7, config.optim.min_lr_ratio)
    assert rows[-1]["learning_rate"] == pytest.approx(float(schedule(6)), rel=1e-5)
    assert float(schedule(7)) == pytest.approx(floor, rel=1e-6)
    assert rows[-1]["learning_rate"] < floor + 0.1 * (peak - floor)
