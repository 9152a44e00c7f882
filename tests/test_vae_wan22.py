"""Wan 2.2 VAE (48 channels, 16x space: diffusers' AutoencoderKLWan with is_residual=True, patch_size=2): parity
with diffusers, import and export, the published size, FLOPs, latents caching and a tiny TI2V run on it."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from test_vae import saved_random_vae, to_channels_last, to_torch_video
from train_utils import REPO, get_config, metrics_rows, subprocess_env

from data_pipelines.sources.latents import LatentsCacheSource
from wamjax.checkpoint.wan_vae_import import (
    export_diffusers_vae_state,
    import_diffusers_wan_vae,
    infer_vae_config,
    write_diffusers_vae,
)
from wamjax.flops.encoders import vae_encode_flops
from wamjax.models.vae import (
    VAEConfig,
    init_vae_params,
    latent_shape,
    vae_config_for,
    vae_decode,
    vae_encode,
    vae_param_count,
)

# The published Wan 2.2 structure at a small width: residual blocks, 2x2 patches, 12 channels in and out.
TINY = dict(base_dim=8, decoder_base_dim=12, z_dim=6, in_channels=12, out_channels=12, is_residual=True,
            patch_size=2, num_res_blocks=1, latents_mean=[0.1] * 6, latents_std=[2.0] * 6, scale_factor_spatial=16)


@pytest.fixture(scope="module")
def tiny_diffusers_vae(tmp_path_factory):
    """A random residual diffusers VAE saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_wan22_vae")
    return saved_random_vae(folder, TINY), folder


def test_encode_decode_match_diffusers(tiny_diffusers_vae):
    model, folder = tiny_diffusers_vae
    vae_config, params = import_diffusers_wan_vae(folder)
    assert vae_config.is_residual and vae_config.patch_size == 2 and vae_config.spatial_compression == 16
    rng = np.random.default_rng(0)
    # Non-square, 1 + 4k frames with k = 2: the chunk caches and both shortcuts' first-chunk rules are exercised.
    video = rng.uniform(-1, 1, size=(2, 9, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        expected = to_channels_last(model.encode(to_torch_video(video)).latent_dist.mean)
    mean = np.asarray(vae_encode(vae_config, params, jnp.asarray(video)))
    assert mean.shape == (2, 3, 2, 3, 6) == latent_shape(vae_config, video.shape)
    np.testing.assert_allclose(mean, expected, atol=1e-4, rtol=0)

    latents = rng.normal(size=(2, 3, 2, 3, 6)).astype(np.float32)
    with torch.no_grad():
        expected_video = to_channels_last(model.decode(to_torch_video(latents)).sample)
    decoded = np.asarray(vae_decode(vae_config, params, jnp.asarray(latents)))
    assert decoded.shape == (2, 9, 32, 48, 3)
    assert np.mean(np.abs(expected_video) < 0.99) > 0.5  # not a comparison of clamped values only
    np.testing.assert_allclose(decoded, expected_video, atol=1e-4, rtol=0)


def test_single_frame_matches_diffusers(tiny_diffusers_vae):
    model, _ = tiny_diffusers_vae
    vae_config, params = import_diffusers_wan_vae(model.state_dict())  # config read off the shapes
    image = np.random.default_rng(1).uniform(-1, 1, size=(1, 1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        expected = to_channels_last(model.encode(to_torch_video(image)).latent_dist.mean)
        expected_image = to_channels_last(model.decode(to_torch_video(expected)).sample)
    mean = np.asarray(vae_encode(vae_config, params, jnp.asarray(image)))
    np.testing.assert_allclose(mean, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(vae_decode(vae_config, params, mean)), expected_image, atol=1e-4, rtol=0)


def test_inferred_config_and_export_round_trip(tiny_diffusers_vae, tmp_path):
    model, folder = tiny_diffusers_vae
    from_folder, params = import_diffusers_wan_vae(folder)
    inferred = infer_vae_config({k: v.numpy() for k, v in model.state_dict().items()})
    # The shapes give everything but the latent statistics (zero mean, unit std for an unknown z_dim).
    assert inferred == VAEConfig(**{**from_folder.__dict__, "latents_mean": (0.0,) * 6, "latents_std": (1.0,) * 6})
    exported = export_diffusers_vae_state(params)
    state = model.state_dict()
    assert sorted(exported) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    back = AutoencoderKLWan.from_pretrained(write_diffusers_vae(tmp_path / "vae", from_folder, params)).eval()
    assert back.config.is_residual and back.config.patch_size == 2 and back.config.scale_factor_spatial == 16
    assert back.config.latents_std == [2.0] * 6
    latents = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 6, 2, 2, 2)).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_array_equal(back.decode(latents).sample.numpy(), model.decode(latents).sample.numpy())


def test_published_config_size_and_native_720p_shapes():
    config = vae_config_for("wan2.2")
    with torch.device("meta"):
        reference = AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v
                                         for k, v in config.to_dict().items()})
    assert vae_param_count(config) == sum(p.numel() for p in reference.parameters()) == 704_688_668
    assert (config.z_dim, config.temporal_compression, config.spatial_compression) == (48, 4, 16)
    assert reference.config.latents_mean == list(config.latents_mean)
    params = jax.eval_shape(lambda: init_vae_params(config, jax.random.key(0)))
    video = jax.ShapeDtypeStruct((1, 81, 704, 1280, 3), jnp.float32)
    latents = jax.eval_shape(lambda p, v: vae_encode(config, p, v), params, video)
    assert latents.shape == (1, 21, 44, 80, 48)
    assert jax.eval_shape(lambda p, z: vae_decode(config, p, z), params, latents).shape == video.shape


def test_encoder_flops_match_xla():
    config = vae_config_for("tiny-wan2.2")
    params = jax.eval_shape(lambda: init_vae_params(config, jax.random.key(0)))
    video = jax.ShapeDtypeStruct((1, 9, 64, 96, 3), jnp.float32)
    compiled = vae_encode.lower(config, params, video).compile().cost_analysis()["flops"]
    # Norms, activations and the averaging shortcuts are left out of the analytic count: about 1% here.
    assert vae_encode_flops(config, 9, (64, 96)) == pytest.approx(compiled, rel=0.03)


def test_bad_configs_and_videos_are_named():
    config = vae_config_for("tiny-wan2.2")
    params = jax.eval_shape(lambda: init_vae_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="divisible by 16"):
        jax.eval_shape(lambda p: vae_encode(config, p, jnp.zeros((1, 5, 24, 32, 3))), params)
    with pytest.raises(ValueError, match=r"expected \[B, T, H, W, 3\]"):
        jax.eval_shape(lambda p: vae_encode(config, p, jnp.zeros((1, 5, 32, 32, 12))), params)
    with pytest.raises(ValueError, match="attn_scales.*is_residual=True"):
        VAEConfig.from_dict({**TINY, "attn_scales": [0.5]})
    with pytest.raises(ValueError, match="in_channels=10 is not a multiple of patch_size"):
        VAEConfig.from_dict({**TINY, "in_channels": 10})
    with pytest.raises(KeyError, match="unknown VAE size 'wan2.3'.*tiny-wan2.2"):
        vae_config_for("wan2.3")


def test_tiny_ti2v_trains_both_stages_on_it_and_caches_its_latents(tmp_path):
    """size=tiny-ti2v over the tiny Wan 2.2 VAE: online encoding in the step, then the latents cache."""
    from wamjax.train.loop import train

    config = get_config("size=tiny-ti2v,stage=all")
    config.vae.size = "tiny-wan2.2"
    config.data.resolution = (64, 64)
    config.stages.video_pretrain.steps = config.stages.action_tune.steps = 1
    config.train.log_every, config.checkpoint.async_save = 1, False
    train(config, str(tmp_path / "run"))
    rows = metrics_rows(str(tmp_path / "run"))
    assert [r["stage"] for r in rows] == ["video_pretrain", "action_tune"]
    assert all(np.isfinite(r["loss"]) for r in rows) and "loss_action" in rows[-1]

    out = str(tmp_path / "latents")
    subprocess.run([sys.executable, "-m", "wamjax.jobs.encode_latents",
                    f"--config={os.path.join(REPO, 'configs', 'wam.py')}:size=tiny-ti2v",
                    "--config.vae.size=tiny-wan2.2", "--config.data.resolution=64,64", "--config.data.batch_size=2",
                    f"--out={out}", "--num_batches=1"],
                   cwd=REPO, env=subprocess_env(1), check=True, capture_output=True, text=True, timeout=600)
    source = LatentsCacheSource(out, vae_config=vae_config_for("tiny-wan2.2"))
    assert len(source) == 2 and source[0]["latents"].shape == (3, 4, 4, 48)
