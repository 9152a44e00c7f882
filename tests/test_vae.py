"""Wan VAE: parity with diffusers' AutoencoderKLWan, weight import, sizes, the functional API, latents cache."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.numpy import save_file

from data_pipelines.sources.latents import LatentsCacheSource, make_latents_dataset
from wamjax.checkpoint.wan_vae_import import (
    export_diffusers_vae_state,
    import_diffusers_wan_vae,
    infer_vae_config,
)
from wamjax.jobs.encode_latents import encode_batches
from wamjax.models.vae import (
    VAEConfig,
    denormalize_latents,
    frames_to_video,
    init_vae_params,
    latent_shape,
    normalize_latents,
    vae_config_for,
    vae_decode,
    vae_encode,
    vae_param_count,
)

TINY_DIFFUSERS = dict(base_dim=16, z_dim=8, num_res_blocks=1, latents_mean=[0.1] * 8, latents_std=[2.0] * 8)


def saved_random_vae(folder, config: dict) -> AutoencoderKLWan:
    """A random diffusers VAE of `config` with non-trivial RMS-norm gains, saved to `folder` with save_pretrained."""
    torch.manual_seed(0)
    model = AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny_diffusers_vae(tmp_path_factory):
    """A random tiny diffusers VAE saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_wan_vae")
    return saved_random_vae(folder, TINY_DIFFUSERS), folder


def to_torch_video(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def to_channels_last(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 4, 1)


def test_encode_decode_match_diffusers(tiny_diffusers_vae):
    model, folder = tiny_diffusers_vae
    vae_config, params = import_diffusers_wan_vae(folder)
    assert vae_config.z_dim == 8 and vae_config.latents_std == (2.0,) * 8

    rng = np.random.default_rng(0)
    # Non-square, 1 + 4k frames with k = 2 so the cross-chunk feature cache is exercised twice.
    video = rng.uniform(-1, 1, size=(2, 9, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        expected_mean = to_channels_last(model.encode(to_torch_video(video)).latent_dist.mean)
    mean = np.asarray(vae_encode(vae_config, params, jnp.asarray(video)))
    assert mean.shape == (2, 3, 2, 3, 8) == latent_shape(vae_config, video.shape)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-4, rtol=0)

    latents = rng.normal(size=(2, 3, 2, 3, 8)).astype(np.float32) * 0.5
    with torch.no_grad():
        expected_video = to_channels_last(model.decode(to_torch_video(latents)).sample)
    decoded = np.asarray(vae_decode(vae_config, params, jnp.asarray(latents)))
    assert decoded.shape == (2, 9, 16, 24, 3)
    # Enough values inside (-1, 1) that the comparison is not just of clamped values.
    assert np.mean(np.abs(expected_video) < 0.99) > 0.5
    np.testing.assert_allclose(decoded, expected_video, atol=1e-4, rtol=0)


def test_single_frame_clip_matches_diffusers(tiny_diffusers_vae):
    model, _ = tiny_diffusers_vae
    vae_config, params = import_diffusers_wan_vae(model.state_dict())
    image = np.random.default_rng(1).uniform(-1, 1, size=(1, 1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = to_channels_last(model.encode(to_torch_video(image)).latent_dist.mean)
        expected_image = to_channels_last(model.decode(torch.from_numpy(expected.transpose(0, 4, 1, 2, 3))).sample)
    mean = np.asarray(vae_encode(vae_config, params, jnp.asarray(image)))
    np.testing.assert_allclose(mean, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(vae_decode(vae_config, params, mean)), expected_image, atol=1e-4, rtol=0)


def test_import_sources_agree_and_round_trip(tiny_diffusers_vae, tmp_path):
    model, folder = tiny_diffusers_vae
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    file = tmp_path / "vae.safetensors"
    save_file(state, str(file))
    from_folder = import_diffusers_wan_vae(folder)[1]
    config_from_file, from_file = import_diffusers_wan_vae(file)
    # Without a config.json the architecture is read off the shapes.
    assert config_from_file.dim_mult == (1, 2, 4, 4) and config_from_file.num_res_blocks == 1
    assert config_from_file.temperal_downsample == (False, True, True)
    for a, b in zip(jax.tree_util.tree_leaves(from_folder), jax.tree_util.tree_leaves(from_file), strict=True):
        np.testing.assert_array_equal(a, b)
    exported = export_diffusers_vae_state(from_folder)
    assert exported.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(exported[key], state[key], err_msg=key)


def test_import_strict_key_check(tiny_diffusers_vae):
    model, _ = tiny_diffusers_vae
    state = dict(model.state_dict())
    config = infer_vae_config(state)

    missing = dict(state)
    del missing["decoder.conv_out.bias"]
    with pytest.raises(KeyError, match="missing key 'decoder.conv_out.bias'"):
        import_diffusers_wan_vae(missing, config)

    unexpected = dict(state) | {"encoder.extra.weight": torch.zeros(3)}
    with pytest.raises(KeyError, match="unexpected key 'encoder.extra.weight'"):
        import_diffusers_wan_vae(unexpected, config)

    wrong_shape = dict(state) | {"quant_conv.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match="shape mismatch for 'quant_conv.bias'"):
        import_diffusers_wan_vae(wrong_shape, config)


def test_full_wan21_config_param_count():
    # diffusers' AutoencoderKLWan() default (the published Wan 2.1 VAE) has 126,892,531 parameters.
    assert vae_param_count(vae_config_for("wan2.1")) == 126_892_531
    video = jax.ShapeDtypeStruct((1, 33, 240, 416, 3), jnp.float32)
    config = vae_config_for("wan2.1")
    params = jax.eval_shape(lambda: init_vae_params(config, jax.random.key(0)))
    latents = jax.eval_shape(lambda p, v: vae_encode(config, p, v), params, video)
    assert latents.shape == (1, 9, 30, 52, 16)
    decoded = jax.eval_shape(lambda p, z: vae_decode(config, p, z), params, latents)
    assert decoded.shape == video.shape


def test_tiny_random_vae_round_trip_shapes_and_normalization():
    config = vae_config_for("tiny")
    assert config.z_dim == 16
    params = init_vae_params(config, jax.random.key(0))
    video = jax.random.uniform(jax.random.key(1), (2, 9, 32, 32, 3), minval=-1, maxval=1)
    latents = jax.jit(lambda p, v: jax.lax.stop_gradient(vae_encode(config, p, v)))(params, video)
    assert latents.shape == (2, 3, 4, 4, 16)
    assert bool(jnp.all(jnp.isfinite(latents)))
    decoded = vae_decode(config, params, latents)
    assert decoded.shape == video.shape and float(jnp.max(jnp.abs(decoded))) <= 1.0
    # One clip at a time (bounded memory) gives the same latents and video.
    np.testing.assert_allclose(vae_encode(config, params, video, batch_chunk=1), latents, atol=1e-5)
    np.testing.assert_allclose(vae_decode(config, params, latents, batch_chunk=1), decoded, atol=1e-5)
    normalized = normalize_latents(config, latents)
    mean = jnp.asarray(config.latents_mean)
    np.testing.assert_allclose(
        normalized[0, 0, 0, 0], (latents[0, 0, 0, 0] - mean) / jnp.asarray(config.latents_std), rtol=1e-5
    )
    np.testing.assert_allclose(denormalize_latents(config, normalized), latents, atol=1e-5)


def test_bad_inputs_name_the_shape():
    config = vae_config_for("tiny")
    params = jax.eval_shape(lambda: init_vae_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="6 frames; expected 1 \\+ 4k"):
        jax.eval_shape(lambda p: vae_encode(config, p, jnp.zeros((1, 6, 16, 16, 3))), params)
    with pytest.raises(ValueError, match="expected height and width divisible by 8"):
        jax.eval_shape(lambda p: vae_encode(config, p, jnp.zeros((1, 5, 12, 16, 3))), params)
    with pytest.raises(KeyError, match="unknown VAE size 'huge'"):
        vae_config_for("huge")
    with pytest.raises(KeyError, match="unknown VAE config key.*'dim'"):
        VAEConfig.from_dict({"dim": 96})


def contract_batches(num_batches: int, batch_size: int = 2, frames: int = 5, size: int = 16):
    rng = np.random.default_rng(3)
    for i in range(num_batches):
        yield {
            "frames": rng.integers(0, 256, size=(batch_size, frames, size, size, 3), dtype=np.uint8),
            "frame_mask": np.ones((batch_size, frames), bool),
            "actions": rng.normal(size=(batch_size, frames - 1, 7)).astype(np.float32),
            "action_mask": np.ones((batch_size, frames - 1), bool),
            "proprio": np.zeros((batch_size, 8), np.float32),
            "instruction": np.array([f"task {i} {b}" for b in range(batch_size)]),
            "dataset_index": np.full((batch_size,), i, np.int32),
        }


def test_latents_cache_round_trip(tmp_path):
    config = vae_config_for("tiny")
    params = init_vae_params(config, jax.random.key(0))
    out = str(tmp_path / "latents")
    count = encode_batches(contract_batches(5), config, params, out, num_batches=3)
    assert count == 6  # num_batches stops the (longer) stream
    source = LatentsCacheSource(out, vae_config=config)
    batches = list(contract_batches(3))
    example = source[3]
    assert "frames" not in example and example["latents"].shape == (2, 2, 2, 16)
    assert example["instruction"] == "task 1 1" and example["dataset_index"] == 1
    np.testing.assert_array_equal(example["actions"], batches[1]["actions"][1])
    expected = vae_encode(config, params, frames_to_video(jnp.asarray(batches[1]["frames"])))
    np.testing.assert_allclose(example["latents"], np.asarray(expected)[1], atol=1e-5)

    dataset = make_latents_dataset(out, batch_size=4, seed=0, num_epochs=1)
    got = list(dataset)
    assert len(got) == 1 and got[0]["latents"].shape == (4, 2, 2, 2, 16)
    assert got[0]["instruction"].dtype.kind == "U"

    other = VAEConfig(base_dim=8, num_res_blocks=1)
    with pytest.raises(ValueError, match="was encoded with VAE config"):
        LatentsCacheSource(out, vae_config=other)
    with pytest.raises(FileNotFoundError, match="is not a latents cache"):
        LatentsCacheSource(str(tmp_path))


def test_encode_latents_cli_uses_the_runs_vae(tmp_path):
    out = str(tmp_path / "latents")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [
            sys.executable, "-m", "wamjax.jobs.encode_latents", "--config=configs/wam.py:size=tiny",
            "--config.data.batch_size=2", f"--out={out}", "--num_batches=1",
        ],
        cwd=repo_root, check=True, capture_output=True, text=True,
    )  # fmt: skip
    source = LatentsCacheSource(out, vae_config=vae_config_for("tiny"))
    assert len(source) == 2 and source[0]["latents"].shape == (3, 4, 4, 16)
    assert source.metadata["vae_seed"] == 1234 and source.metadata["normalized"] is False
