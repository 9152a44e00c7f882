"""The CPU lab pipeline, a few steps of it: pixel-patch latents, a two-camera cache, the lab config, the vision
ablation.

The full benchmark (`benchmarks/closed_loop.py`) trains for minutes; here every stage runs for real on two expert
episodes, and only what can't drift with training length is asserted.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import REPO, subprocess_env

from data_pipelines.sources.latents import LatentsCacheSource
from data_pipelines.standardize import stats as stats_lib
from wamjax import config_files
from wamjax.flops.encoders import vae_encode_flops
from wamjax.flops.stage import train_step_flops
from wamjax.jobs.collect_sim import collect_metaworld
from wamjax.models import vae as vae_lib
from wamjax.stages import stage_spec

TASKS = ["reach-v3", "push-v3"]


def lab_config(data_dir: str, stats_path: str):
    config = config_files.get_config(f"{REPO}/configs/lab.py")
    config.data.data_dir, config.data.stats_path = data_dir, stats_path
    config.checkpoint.async_save = False
    return config


def test_pixel_patches_keep_every_pixel_of_the_kept_frames():
    cfg = vae_lib.vae_config_for("pixels4")
    video = jax.random.uniform(jax.random.key(0), (2, 9, 16, 24, 3), minval=-1.0, maxval=1.0)
    latents = vae_lib.vae_encode(cfg, {}, video)
    assert latents.shape == vae_lib.latent_shape(cfg, video.shape) == (2, 3, 4, 6, 48) and cfg.z_dim == 48
    # Latent frame 1 is clip frame 4; its patch (0, 1) holds rows 0-3 and columns 4-7 of that frame.
    np.testing.assert_array_equal(np.asarray(latents[0, 1, 0, 1]).reshape(4, 4, 3), np.asarray(video[0, 4, :4, 4:8]))
    decoded = vae_lib.vae_decode(cfg, {}, latents)
    assert decoded.shape == video.shape
    np.testing.assert_array_equal(decoded[:, ::4], video[:, ::4])  # exact where kept
    np.testing.assert_allclose(decoded[:, 2], (video[:, 0] + video[:, 4]) / 2, atol=1e-6)  # linear between
    assert vae_lib.init_vae_params(cfg, jax.random.key(0)) == {} and vae_encode_flops(cfg, 9, (64, 64)) == 0.0
    normalized = vae_lib.normalize_latents(cfg, jnp.zeros((1, 1, 1, 1, 48)))
    assert float(normalized.max()) == 0.0
    with pytest.raises(KeyError, match=r"unknown VAE size 'pixels'.*pixels<p>"):
        vae_lib.vae_config_for("pixels")


def test_lab_config_sees_the_scene_in_tokens_and_costs_no_encoder_flops():
    config = config_files.get_config(f"{REPO}/configs/lab.py")
    flops = train_step_flops(stage_spec(config, "action_tune"))
    # 2 latent frames x 2 camera views x (64 / 4 / 2)^2 tokens: 64 tokens per view and latent frame.
    assert flops.video_tokens == 2 * 2 * 64 and flops.action_tokens == 4
    assert flops.frozen_per_step == 0.0
    with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['data'\] of configs/lab.py"):
        config_files.get_config(f"{REPO}/configs/lab.py:data=synthetic")


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """Two expert episodes per task -> stats -> the lab latents cache (its CLI) -> a few training steps."""
    from wamjax.train.loop import train

    root = tmp_path_factory.mktemp("lab")
    data_dir = str(root / "data")
    collect_metaworld(data_dir, TASKS, 2, resolution=(64, 64))
    stats_path = str(root / "stats.json")
    stats_lib.save_stats(stats_lib.compute_stats(data_dir, ["metaworld"]), stats_path)
    cache = str(root / "latents")
    subprocess.run([sys.executable, "-m", "wamjax.jobs.encode_latents", f"--config={REPO}/configs/lab.py",
                    f"--config.data.data_dir={data_dir}", f"--config.data.stats_path={stats_path}",
                    f"--out={cache}", "--num_batches=2"],
                   cwd=REPO, env=subprocess_env(1), check=True, capture_output=True, text=True, timeout=600)
    config = lab_config(data_dir, stats_path)
    config.data.latents_cache = cache
    config.train.steps, config.train.log_every, config.checkpoint.every_steps = 4, 2, 4
    workdir = str(root / "run")
    train(config, workdir)
    return root, data_dir, stats_path, cache, workdir


def test_a_two_camera_cache_trains_the_lab_model_with_no_frozen_encoder(lab_run):
    _, _, _, cache, workdir = lab_run
    source = LatentsCacheSource(cache, vae_lib.vae_config_for("pixels4"))
    example = source[0]
    assert "frames" not in example and example["latents"].shape == (2, 2, 16, 16, 48)  # [T', V, h, w, z]
    assert source.metadata["data"]["cameras"] == "primary,wrist" and source.metadata["vae"]["kind"] == "pixel_patches"
    with open(f"{workdir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["frozen_flops_per_step"] == 0.0 and 0.0 <= r["data_s_per_step"] < r["step_time_s"] for r in rows)


def test_a_cache_for_other_cameras_is_refused_naming_both(lab_run):
    from wamjax.stages import stage_spec
    from wamjax.train.inputs import make_stage_dataset

    _, data_dir, stats_path, cache, _ = lab_run
    config = lab_config(data_dir, stats_path)
    config.data.latents_cache, config.data.cameras = cache, "primary"
    with pytest.raises(ValueError, match=r"data.cameras: cache 'primary,wrist', run 'primary'"):
        make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)
    config.data.cameras, config.vae.size = "primary,wrist", "pixels8"
    expected = r"encoded with VAE config .*'patch': 4.*this run's VAE config is .*'patch': 8"
    with pytest.raises(ValueError, match=expected):
        make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)


def test_the_vision_ablation_offline_and_in_the_closed_loop(lab_run, tmp_path):
    _, _, _, _, workdir = lab_run
    from wamjax.eval.offline import vision_ablation

    rows = vision_ablation(f"{workdir}/checkpoints", max_episodes=3, windows_per_episode=1, num_steps=1,
                           out=str(tmp_path / "offline"), print_fn=lambda _: None)
    (row,) = rows
    assert row["windows"] == 3 and set(row["mae"]) == {"camera", "blank", "other_episode", "mean_action"}
    assert all(np.isfinite(v) and v > 0 for v in row["mae"].values())
    assert row["mae"]["camera"] != row["mae"]["blank"]  # the frames reach the model
    saved = json.loads((tmp_path / "offline" / "vision_ablation.json").read_text())
    assert saved["datasets"][0]["mae"] == row["mae"]

    out = tmp_path / "closed_loop"
    run = subprocess.run([sys.executable, "-m", "wamjax.eval.closed_loop", f"--checkpoint={workdir}/checkpoints",
                          "--tasks=reach-v3", "--episodes=1", "--max_steps=8", "--resolution=64,64", "--num_steps=1",
                          "--vision_ablation=blank", f"--out={out}"],
                         cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["policy"] == "wam (joint, infer, blank camera)"
    assert summary["tasks"]["reach-v3"]["episodes"] == 1


def test_action_free_videos_mix_with_demonstrations_and_mask_the_action_loss(lab_run, tmp_path):
    """Co-training's data: an action-free cache mixed into the action stage by weight; its examples carry no
    actions, and the step counts only the demonstrations' actions."""
    from wamjax.jobs.encode_latents import encode_run_cache
    from wamjax.stages import stage_spec
    from wamjax.train.inputs import make_stage_dataset

    _, data_dir, stats_path, cache, _ = lab_run
    config = lab_config(data_dir, stats_path)
    videos = str(tmp_path / "videos")
    encode_run_cache(config, videos, num_batches=2, action_free=True)
    stats = stats_lib.load_stats(stats_path)
    config.stages.action_tune.latents_cache = f"{cache},{videos}"
    config.stages.action_tune.latents_cache_weights = (1.0, 3.0)
    dataset, got_stats = make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)
    assert got_stats == stats
    has = np.concatenate([batch["has_actions"] for _, batch in zip(range(8), iter(dataset), strict=False)])
    assert 0.1 < has.mean() < 0.45  # about a quarter of the examples are demonstrations
    config.stages.action_tune.latents_cache_weights = (1.0,)
    with pytest.raises(ValueError, match=r"data.latents_cache_weights=\(1.0,\): expected 2 non-negative"):
        make_stage_dataset(stage_spec(config, "action_tune"), 0, 1)
