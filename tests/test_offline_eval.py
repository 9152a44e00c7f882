"""Offline evaluation: the held-out split, frame metrics, eval rows of a tiny training run, and the CLI."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import REPO, get_config, subprocess_env

from data_pipelines import config as data_config_lib
from data_pipelines import make_oxe_like, pipeline
from data_pipelines.clips import holdout
from data_pipelines.sources.episodes import open_episodes
from data_pipelines.standardize import stats as stats_lib
from wamjax.eval.clip_metrics import psnr, ssim
from wamjax.eval.hooks import loop_hooks
from wamjax.flops.report import read_log
from wamjax.train.loop import train


def test_held_out_episodes_are_disjoint_deterministic_and_never_trained_on(tmp_path):
    train_ids = holdout.split_episodes("bridge", 500, 0.2, evaluation=False)
    eval_ids = holdout.split_episodes("bridge", 500, 0.2, evaluation=True)
    assert not set(train_ids) & set(eval_ids) and len(train_ids) + len(eval_ids) == 500
    assert 60 < len(eval_ids) < 140  # about a fifth
    np.testing.assert_array_equal(eval_ids, holdout.split_episodes("bridge", 500, 0.2, evaluation=True))
    np.testing.assert_array_equal(eval_ids[eval_ids < 100], holdout.split_episodes("bridge", 100, 0.2,
                                                                                  evaluation=True))
    assert set(eval_ids) != set(holdout.split_episodes("droid", 500, 0.2, evaluation=True))  # per dataset
    with pytest.raises(ValueError, match="data.eval_fraction=1.0"):
        holdout.held_out("bridge", 10, 1.0)

    # On a real (tiny) TFDS dataset: the clips of the training stream and of the eval stream come from
    # disjoint episodes, and the eval stream is the same on every pass.
    out = str(tmp_path)
    make_oxe_like.make_datasets(out, ["bridge"], episodes=10, seed=1, image_size=(16, 16))
    stats = stats_lib.compute_stats(out, ["bridge"])
    data = data_config_lib.get_data_config()
    data.update(data_dir=out, datasets="bridge", resolution=(16, 16), num_frames=5, clips_per_episode=1,
                eval_fraction=0.3)
    held = set(holdout.split_episodes("bridge", 10, 0.3, evaluation=True))
    assert 0 < len(held) < 10
    first_frame = lambda clip: clip["frames"][0].tobytes()
    evals = pipeline.clip_source(data, "bridge", 0, stats, evaluation=True)
    assert len(evals) == len(held)
    eval_frames = [first_frame(evals[i]) for i in range(len(evals))]
    assert eval_frames == [first_frame(evals[i]) for i in range(len(evals))]
    training = pipeline.clip_source(data, "bridge", 0, stats)
    train_frames = {first_frame(training[i]) for i in range(3 * (10 - len(held)))}
    # Clip starts vary per epoch, so compare episodes by their frames at every start: none is shared.
    source = open_episodes(out, "bridge")
    frames_of = {e: {source[e].decode_frame(i, (16, 16)).tobytes() for i in range(len(source[e]))}
                 for e in range(10)}
    train_episodes = {e for e, fs in frames_of.items() if fs & train_frames}
    eval_episodes = {e for e, fs in frames_of.items() if fs & set(eval_frames)}
    assert eval_episodes == held and not train_episodes & held


def test_psnr_and_ssim_are_inf_and_one_on_identical_frames_and_fall_with_noise():
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.uniform(-1, 1, (2, 3, 24, 24, 3)), jnp.float32)
    assert np.all(np.isinf(psnr(frames, frames)))
    np.testing.assert_allclose(ssim(frames, frames), 1.0, atol=1e-5)
    small = jnp.clip(frames + 0.05 * jax.random.normal(jax.random.key(0), frames.shape), -1, 1)
    large = jnp.clip(frames + 0.5 * jax.random.normal(jax.random.key(1), frames.shape), -1, 1)
    assert np.all(psnr(small, frames) > psnr(large, frames)) and np.all(psnr(large, frames) > 0)
    assert np.all(ssim(frames, frames) > ssim(small, frames)) and np.all(ssim(small, frames) > ssim(large, frames))


def test_tiny_training_run_writes_eval_rows_and_the_cli_prints_a_table(tmp_path):
    workdir = str(tmp_path / "run")
    config = get_config("size=tiny,stage=action_tune")
    config.train.steps = 2
    config.train.log_every = 1
    config.checkpoint.async_save = False
    config.eval.every_steps = 2
    config.eval.num_batches = 1
    config.eval.num_steps = 1
    config.eval.modes = "joint,world_model"
    train(config, workdir, hooks=loop_hooks())
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2]
    row = evals[0]
    assert row["overall/num_examples"] == config.data.batch_size
    for key in ("flow_loss_video", "flow_loss_action", "joint/action_mse", "joint/action_l1",
                "joint/gripper_accuracy", "joint/psnr", "joint/ssim", "world_model/psnr"):
        assert np.isfinite(row[f"overall/{key}"]) and np.isfinite(row[f"synthetic/{key}"]), key
    assert len(row["overall/joint/action_mse_per_dim"]) == 7
    assert 0.0 <= row["overall/joint/gripper_accuracy"] <= 1.0
    assert "overall/world_model/action_mse" not in row  # the world model is given the actions
    assert len(glob.glob(os.path.join(workdir, "eval", "step_2_synthetic_*.png"))) == 2
    step_rows, _ = read_log(os.path.join(workdir, "metrics.jsonl"))  # the FLOP report's reader
    assert [r["step"] for r in step_rows] == [1, 2] and all("kind" not in r for r in step_rows)

    out = str(tmp_path / "cli")
    proc = subprocess.run(
        [sys.executable, "-m", "wamjax.eval.offline", f"--checkpoint={workdir}/checkpoints", f"--out={out}",
         "--modes=imagine_then_act", "--num_batches=1", "--batch_size=2", "--num_steps=1"],
        cwd=REPO, env=subprocess_env(devices=1), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overall/imagine_then_act/action_mse" in proc.stdout and "synthetic/flow_loss_video" in proc.stdout
    assert len(glob.glob(os.path.join(out, "step_2_synthetic_imagine_then_act_*.png"))) == 1
    with open(os.path.join(out, "offline_eval.json")) as f:
        assert json.load(f)["overall/num_examples"] == 2


def test_the_loop_refuses_a_scheduled_evaluation_without_hooks(tmp_path):
    """The loop imports no evaluation: a config that schedules one, trained without hooks, is refused by name
    before anything is written."""
    config = get_config("size=tiny,stage=video_pretrain")
    config.eval.every_steps = 2
    with pytest.raises(ValueError, match=r"eval\.every_steps=2.*hooks=wamjax\.eval\.hooks\.loop_hooks\(\)"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    config.eval.every_steps, config.eval.closed_loop_every_steps = 0, 3
    with pytest.raises(ValueError, match=r"eval\.closed_loop_every_steps=3"):
        train(config, tmp_path / "run")
