"""Several cameras and Wan2.1-I2V conditioning at inference: the KV-cached rollout, the sampler and Policy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import get_config

from data_pipelines.clips import views
from wamjax.diffusion.sampler import SamplerOptions, sample
from wamjax.inference import kv_cache as kv
from wamjax.inference.policy import Policy
from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.wam import i2v_model_input, init_params, wam_forward

H = W = 4
TEXT_LEN = 8
IMAGE_TOKENS = 5
jitted_init = jax.jit(init_params, static_argnums=(0, 2, 3, 4))
jitted_forward = jax.jit(wam_forward, static_argnums=0)
jitted_commit = jax.jit(kv._commit, static_argnums=(0, 1, 2))
jitted_chunk_pass = jax.jit(kv._chunk_pass, static_argnums=(0, 1, 2))


def test_tile_views_grid():
    v = np.stack([np.full((2, 3, 1), i + 1, np.uint8) for i in range(3)])  # three 2x3 views
    tiled = views.tile_views(v)
    assert tiled.shape == (4, 6, 1)
    np.testing.assert_array_equal(tiled[:, :, 0], [[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2],
                                                   [3, 3, 3, 0, 0, 0], [3, 3, 3, 0, 0, 0]])
    assert views.grid_shape(2) == (1, 2) and views.grid_shape(4) == (2, 2) and views.grid_shape(5) == (2, 3)
    assert views.view_resolution((352, 640), 3, "tile") == (176, 320)  # DreamZero's three 320x176 views
    with pytest.raises(ValueError, match=r"data.resolution=\(33, 64\) does not split into the 2x2 grid"):
        views.view_resolution((33, 64), 3, "tile")


def _i2v_inputs(seed, batch, frames, num_actions):
    r = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return (f32(batch, frames, H, W, 16), f32(batch, num_actions, 7), f32(batch, 8), f32(batch, TEXT_LEN, 32),
            f32(batch, frames, H, W, 16), f32(batch, IMAGE_TOKENS, 32))


def test_i2v_cached_chunk_forward_equals_full_sequence_forward():
    """The KV cache reads the first-frame conditioning channels and the image tokens as the full model does."""
    num_chunks = 3
    cfg = ModelConfig.from_dict({**SIZES["tiny-i2v"], "attention_layout": "chunk_causal", "chunk_latent_frames": 1})
    frames, num_actions = 1 + num_chunks, num_chunks * cfg.action_frames_per_latent
    params = jitted_init(cfg, jax.random.key(3), (frames, H, W, 36), TEXT_LEN, num_actions)
    latents, actions, proprio, text, condition, image = _i2v_inputs(4, 2, frames, num_actions)
    a = num_actions // num_chunks
    t_video = jnp.zeros((2, frames)).at[:, -1].set(637.0)
    t_action = jnp.zeros((2, num_actions)).at[:, -a:].set(421.0)
    full = jitted_forward(cfg, params, i2v_model_input(latents, condition), t_video, text, actions=actions,
                          t_action=t_action, proprio=proprio, image_embeddings=image)

    geometry = kv.ChunkGeometry.for_model(cfg, (H, W), num_chunks)
    options = SamplerOptions(cfg_scale=2.0)  # the doubled (guided) batch carries the conditioning too
    state = kv.start_rollout(cfg, geometry, options, params, latents[:, :1], text, proprio, (condition, image))
    for j in range(1, num_chunks):
        state = jitted_commit(cfg, geometry, options, params, state, jnp.int32(j), latents[:, j:j + 1],
                              actions[:, (j - 1) * a: j * a])
    out = jitted_chunk_pass(cfg, geometry, options, params, state, jnp.int32(num_chunks), latents[:, -1:],
                            t_video[:, -1:], actions[:, -a:], t_action[:, -a:])
    np.testing.assert_allclose(out.video[:2], full.video[:, -1:], atol=1e-4)
    np.testing.assert_allclose(out.actions[:2], full.actions[:, -a:], atol=1e-4)

    # The sampler conditions the same way: one Euler step from t=1 equals x + (t1 - 1) * velocity.
    one = SamplerOptions(num_steps=1)
    noise_v, noise_a = latents[:, 1:], actions
    out = sample(cfg, params, latents[:, :1], text, proprio, noise_v, noise_a, options=one,
                 image_conditioning=(condition, image))
    t_v = jnp.zeros((2, frames)).at[:, 1:].set(1000.0)
    ref = jitted_forward(cfg, params, i2v_model_input(latents, condition), t_v, text, actions=noise_a,
                         t_action=jnp.full((2,), 1000.0), proprio=proprio, image_embeddings=image)
    np.testing.assert_allclose(out.actions, noise_a - ref.actions, atol=1e-4)
    np.testing.assert_allclose(out.latents[:, 1:], noise_v - ref.video[:, 1:], atol=1e-4)


def _i2v_two_camera_policy(layout: str) -> Policy:
    config = get_config("size=tiny-i2v,stage=action_tune")
    config.data.cameras = "primary,wrist"
    config.model.attention_layout = layout
    cfg = ModelConfig.from_dict({**config.model.to_dict(), "proprio_dim": config.data.proprio_dim})
    frames = 1 + (config.data.num_frames - 1) // 4
    params = jitted_init(cfg, jax.random.key(8), (frames, H, W, 36), TEXT_LEN, config.data.num_frames - 1)
    return Policy(config, params, {}, options=SamplerOptions(num_steps=2))


def test_i2v_policy_takes_two_cameras_in_infer_and_closed_loop():
    policy = _i2v_two_camera_policy("chunk_causal")
    assert policy.metadata["cameras"] == 2
    rng = np.random.default_rng(0)
    primary, wrist = rng.integers(0, 255, (48, 64, 3), np.uint8), rng.integers(0, 255, (24, 24, 3), np.uint8)
    # Two cameras tile a 1x2 grid of the 32x32 frame: each is resized to 32x16.
    frame = policy.prepare_frames([primary, wrist])
    assert frame.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(policy.prepare_frames(np.stack([primary[:24, :24], wrist]))[0, :, 16:],
                                  frame[0, :, 16:])
    # The wrist camera reaches the model: a different wrist image changes the actions (same noise seed).
    policy._rng = jax.random.key(1)
    a = policy.infer([primary, wrist], np.zeros(8, np.float32), "pick")["actions"]
    assert a.shape == (8, 7) and np.all(np.isfinite(a))
    policy._rng = jax.random.key(1)
    b = policy.infer([primary, 255 - wrist], None, "pick")["actions"]
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match=r"1 camera images; this policy reads 2 cameras \['primary', 'wrist'\]"):
        policy.infer([primary], None, "pick")
    with pytest.raises(ValueError, match=r"images have shape \(48, 64, 3\); this policy reads 2 cameras"):
        policy.infer(primary, None, "pick")

    # Closed loop over the KV cache: each observation is both cameras' frames of the executed chunk.
    camera = lambda *shape: rng.integers(0, 255, shape, np.uint8)
    session = policy.start_rollout([camera(32, 32, 3), camera(32, 32, 3)], None, "pick")
    assert session.rollout.state.condition.shape == (1, 3, H, W, 20)  # mask + first-frame latents, whole window
    for _ in range(3):  # the third chunk re-anchors the cache (and its conditioning) on the newest frame
        actions = session.next_actions()
        assert actions.shape == (4, 7) and np.all(np.isfinite(actions))
        session.observe([camera(4, 32, 32, 3), camera(4, 20, 20, 3)])
    session.next_actions()
    with pytest.raises(ValueError, match="camera images disagree on their number of frames"):
        session.observe([camera(4, 32, 32, 3), camera(3, 32, 32, 3)])


@pytest.mark.slow  # end to end like the notebooks: about 4 CPU-minutes (compiles the I2V step and the policy)
def test_i2v_action_tune_config_two_cameras_train_export_serve(tmp_path):
    """configs/i2v_action_tune.py end to end: train on two tiled cameras, export for diffusers, serve one request."""
    from diffusers import WanTransformer3DModel
    from train_utils import REPO

    from data_pipelines import make_oxe_like
    from data_pipelines.standardize import stats as stats_lib
    from wamjax import config_files
    from wamjax.export import to_torch
    from wamjax.serving.client import PolicyClient, ServerError
    from wamjax.serving.serve import PolicyServer
    from wamjax.train.loop import train

    data_dir = str(tmp_path / "oxe")
    make_oxe_like.make_datasets(data_dir, ["taco_play", "droid"], episodes=2, seed=0, image_size=(24, 32))
    stats_lib.save_stats(stats_lib.compute_stats(data_dir, ["taco_play", "droid"]), f"{data_dir}/stats.json")
    config = config_files.get_config(f"{REPO}/configs/i2v_action_tune.py")
    assert config.data.cameras == "primary,wrist" and config.model.image_dim and config.data.source == "oxe"
    config.data.data_dir, config.data.stats_path = data_dir, f"{data_dir}/stats.json"
    config.train.steps, config.train.log_every = 2, 1
    config.checkpoint.async_save = False
    workdir = str(tmp_path / "run")
    train(config, workdir)

    out = str(tmp_path / "export")
    to_torch.export_checkpoint(f"{workdir}/checkpoints", out)
    model, info = WanTransformer3DModel.from_pretrained(f"{out}/transformer", output_loading_info=True)
    assert not any(info.values()), info  # no missing or unexpected keys
    assert model.config.in_channels == 36 and model.config.image_dim == 32
    with open(f"{out}/wam_config.json") as f:
        exported = json.load(f)
    assert exported["cameras"] == ["primary", "wrist"] and exported["view_layout"] == "tile"

    policy = Policy.from_checkpoint(f"{workdir}/checkpoints", num_steps=1, dataset="droid")
    server = PolicyServer(policy, port=0)
    server.start_in_thread()
    try:
        rng = np.random.default_rng(0)
        obs = {"observation/image": rng.integers(0, 255, (224, 224, 3), np.uint8),
               "observation/wrist_image": rng.integers(0, 255, (128, 128, 3), np.uint8),
               "observation/state": rng.standard_normal(7).astype(np.float32), "prompt": "pick"}
        with PolicyClient(port=server.port) as client:
            assert client.metadata["cameras"] == 2
            actions = client.infer(obs)["actions"]
            assert actions.shape == (8, 7) and np.all(np.isfinite(actions))
            del obs["observation/wrist_image"]
            with pytest.raises(ServerError, match="missing key 'observation/wrist_image': this policy reads 2"):
                client.infer(obs)
    finally:
        server.stop()


def test_stage_cameras_and_latents_cache_overrides():
    from wamjax.stages import policy_spec, stage_data_config, stage_spec
    from wamjax.train.inputs import make_stage_dataset

    config = get_config("size=tiny,stage=all")
    config.stages.action_tune.cameras = "primary,wrist"
    assert stage_data_config(config, "action_tune").cameras == "primary,wrist"
    assert stage_data_config(config, "video_pretrain").cameras == ""
    assert policy_spec(config).clip.num_cameras == 2  # a policy reads the action stage's cameras
    config.stages.video_pretrain.latents_cache = "videos"
    assert stage_data_config(config, "video_pretrain").latents_cache == "videos"
    assert stage_data_config(config, "action_tune").latents_cache == ""
    with pytest.raises(FileNotFoundError, match=r"videos/latents_cache.json does not exist"):
        make_stage_dataset(stage_spec(config, "video_pretrain"), 0, 1)
