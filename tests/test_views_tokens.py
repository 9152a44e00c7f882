"""Several cameras as separate token groups (`data.view_layout=tokens`): training, the KV-cached rollout, Policy
and the server with three cameras."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_utils import get_config

from wamjax.checkpoint import clip_import
from wamjax.models import clip
from wamjax.models import vae as vae_lib
from wamjax.models.config import SIZES, ModelConfig, model_config_from_run
from wamjax.models.encoders import encode_first_frames, encode_views
from wamjax.models.token_layout import make_token_layout
from wamjax.models.wam import i2v_model_input, init_params, wam_forward
from wamjax.train.step import StepSpec, TrainState, make_train_step

H = W = 4  # latent height and width of one view (32 px with the tiny VAE)
VIEWS = 3
TEXT_LEN = 8
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jitted_init = jax.jit(init_params, static_argnums=(0, 2, 3, 4))
jitted_forward = jax.jit(wam_forward, static_argnums=0)


def _with_view_embedding(params, seed=5):
    """Parameters with a non-zero view embedding (it starts at zero), so that a view mix-up shows."""
    emb = params["view_embedding"]
    return {**params, "view_embedding": jax.random.normal(jax.random.key(seed), emb.shape, emb.dtype)}


def test_token_layout_groups_views_by_frame_and_shares_positions():
    cfg = ModelConfig.from_dict({**SIZES["tiny"], "attention_layout": "chunk_causal"})
    layout = make_token_layout(cfg, (3, H, W), 8, 1, num_views=VIEWS)
    per_view = (H // 2) * (W // 2)
    assert layout.num_video_tokens == 3 * VIEWS * per_view and layout.num_groups == 3 + 8 + 1
    frame_of_token = layout.token_group[: layout.num_video_tokens].reshape(3, VIEWS, per_view)
    assert (frame_of_token == np.arange(3)[:, None, None]).all()  # all views of a frame: one group, one chunk
    chunk = layout.token_chunk[: layout.num_video_tokens].reshape(3, VIEWS, per_view)
    assert (chunk == chunk[:, :1]).all() and chunk[0, 0, 0] < chunk[1, 0, 0] < chunk[2, 0, 0]
    angles = layout.rope_angles[: layout.num_video_tokens].reshape(3, VIEWS, per_view, -1)
    single = make_token_layout(cfg, (3, H, W), 8, 1).rope_angles[: 3 * per_view].reshape(3, per_view, -1)
    for v in range(VIEWS):  # every view at the positions a lone camera has
        np.testing.assert_array_equal(angles[:, v], single)
    # Teacher-forced (the chunk-causal default): the clean history copy of frame 1 holds all its views, at the
    # noisy copy's chunk and positions.
    tf = make_token_layout(cfg, (3, H, W), 8, 1, teacher_forcing=True, num_views=VIEWS)
    assert tf.history_frames == 1 and tf.num_history_video_tokens == VIEWS * per_view
    frame1 = slice(VIEWS * per_view, 2 * VIEWS * per_view)
    hist = slice(tf.history_offset, tf.history_offset + tf.num_history_video_tokens)
    np.testing.assert_array_equal(tf.rope_angles[hist], layout.rope_angles[frame1])
    np.testing.assert_array_equal(tf.token_chunk[hist], layout.token_chunk[frame1])
    assert (tf.token_copy[hist] == 0).all() and (tf.token_copy[frame1] == 1).all()


def test_views_are_separate_token_groups_with_their_own_embedding():
    cfg = ModelConfig.from_dict(SIZES["tiny"])
    params = jitted_init(cfg, jax.random.key(0), (2, VIEWS, H, W, 16), TEXT_LEN, 4)
    assert params["view_embedding"].shape == (VIEWS, cfg.dim) and not params["view_embedding"].any()
    r = np.random.default_rng(0)
    latents = jnp.asarray(r.standard_normal((2, 2, VIEWS, H, W, 16)), jnp.float32)
    text = jnp.asarray(r.standard_normal((2, TEXT_LEN, 32)), jnp.float32)
    actions, proprio = jnp.asarray(r.standard_normal((2, 4, 7)), jnp.float32), jnp.zeros((2, 8))
    t = jnp.full((2,), 500.0)
    joint = dict(actions=actions, t_action=t, proprio=proprio)
    out = jitted_forward(cfg, params, latents, t, text, **joint)
    assert out.video.shape == latents.shape
    # Swapping two views swaps their velocities while the view embedding is zero (views are symmetric) ...
    swap = jnp.asarray([1, 0, 2])
    swapped = jitted_forward(cfg, params, latents[:, :, swap], t, text, **joint)
    np.testing.assert_allclose(swapped.video, out.video[:, :, swap], atol=1e-5)
    # ... and no longer once each view has its own embedding.
    emb = _with_view_embedding(params)
    a = jitted_forward(cfg, emb, latents, t, text, **joint)
    b = jitted_forward(cfg, emb, latents[:, :, swap], t, text, **joint)
    assert not np.allclose(b.video, a.video[:, :, swap], atol=1e-3)
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"view_embedding.*\(2, 48\).*\(3, 48\)"):
        wam_forward(cfg, params, latents[:, :, :2], t, text, **joint)


def test_each_view_goes_through_the_vae_on_its_own():
    vae_cfg = vae_lib.vae_config_for("tiny")
    vae_params = vae_lib.init_vae_params(vae_cfg, jax.random.key(2))
    r = np.random.default_rng(0)
    video = jnp.asarray(r.uniform(-1, 1, (1, 5, 2, 16, 16, 3)), jnp.float32)
    both = jax.jit(lambda p, v: (encode_views(vae_cfg, p, v), vae_lib.vae_encode(vae_cfg, p, v[:, :, 1])))
    latents, second_view = both(vae_params, video)
    assert latents.shape == (1, 2, 2, 2, 2, vae_cfg.z_dim)
    np.testing.assert_allclose(latents[:, :, 1], second_view, atol=1e-5)


def test_each_view_first_frame_gets_its_own_clip_tokens():
    """I2V on several views: the CLIP tokens of each view's first frame, concatenated view by view."""
    config = get_config("size=tiny-i2v,stage=action_tune")
    image_encoder = clip.encoder_config(config)
    params = clip_import.encoder_params(config, image_encoder)
    first = jnp.asarray(np.random.default_rng(1).integers(0, 255, (1, 2, 32, 32, 3), np.uint8))
    tokens = encode_first_frames(image_encoder, params, first)
    n = image_encoder.num_tokens
    assert tokens.shape == (1, 2 * n, image_encoder.hidden_size)
    np.testing.assert_allclose(tokens[:, n:], clip.encode_frames(image_encoder, params, first[:, 1]), atol=1e-5)


def test_one_train_step_on_three_views():
    """Latents [B, F, V, H, W, C] through the joint chunk-causal step, teacher-forced (a clean copy of every view
    of frame 1 joins the sequence): the loss covers every view and the view embedding trains."""
    config = get_config("size=tiny,stage=action_tune")
    config.model.attention_layout = "chunk_causal"
    cfg = model_config_from_run(config)
    vae_cfg = vae_lib.vae_config_for("tiny")
    assert cfg.history == "teacher_forcing"
    batch_size, num_actions = 2, 8
    latent_shape = (3, VIEWS, H, W, cfg.in_channels)
    params = _with_view_embedding(jitted_init(cfg, jax.random.key(1), latent_shape, TEXT_LEN, num_actions))
    tx = optax.apply_if_finite(optax.sgd(1e-1), 3)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), None, jax.random.key(3))
    spec = StepSpec(cfg, "joint", clean_context_frames=1, vae=vae_cfg)
    step_fn = make_train_step(spec, config.diffusion, tx, optax.constant_schedule(1e-1), 0.0)
    r = np.random.default_rng(4)
    batch = {
        "latents": jnp.asarray(r.standard_normal((batch_size, *latent_shape)), jnp.float32),
        "text_embeddings": jnp.asarray(r.standard_normal((batch_size, TEXT_LEN, cfg.text_dim)), jnp.float32),
        "actions": jnp.asarray(r.uniform(-1, 1, (batch_size, num_actions, 7)), jnp.float32),
        "action_mask": jnp.ones((batch_size, num_actions), bool),
        "proprio": jnp.zeros((batch_size, cfg.proprio_dim), jnp.float32),
    }
    step = jax.jit(step_fn).lower(state, batch, None).compile(FAST_COMPILE)
    new_state, metrics = step(state, batch, None)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss_video"]) > 0
    assert float(metrics["loss_action"]) > 0 and int(metrics["update_skipped"]) == 0
    moved = np.abs(np.asarray(new_state.params["view_embedding"] - params["view_embedding"])).max(axis=1)
    assert (moved > 0).all()  # every view's row gets a gradient


def test_cached_rollout_on_three_views_equals_full_teacher_forced_forward():
    """I2V on three views, chunk-causal and teacher-forced: the KV-cached chunk passes (with CFG's doubled batch)
    equal the full teacher-forced forward, whose clean history copy holds every view of chunk 1 (the cache holds
    them as the rollout observed them); each view is conditioned on its own first frame."""
    from wamjax.diffusion.sampler import SamplerOptions
    from wamjax.inference import kv_cache as kv
    from wamjax.inference.cached_chunk import write_chunk

    num_chunks = 2  # the context chunk cached, then chunk 1 and chunk 2 (which reads chunk 1's clean views)
    cfg = ModelConfig.from_dict({**SIZES["tiny-i2v"], "attention_layout": "chunk_causal"})
    assert cfg.history == "teacher_forcing"
    frames, num_actions = 1 + num_chunks, num_chunks * cfg.action_frames_per_latent
    params = _with_view_embedding(jitted_init(cfg, jax.random.key(3), (frames, VIEWS, H, W, 36), TEXT_LEN,
                                              num_actions))
    r = np.random.default_rng(4)
    f32 = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    clean, noisy, condition = (f32(2, frames, VIEWS, H, W, 16) for _ in range(3))
    noisy = noisy.at[:, 0].set(clean[:, 0])  # the context frame is clean
    clean_actions, noisy_actions = f32(2, num_actions, 7), f32(2, num_actions, 7)
    proprio, text, image = f32(2, 8), f32(2, TEXT_LEN, 32), f32(2, VIEWS * 5, 32)
    a = num_actions // num_chunks
    t_video = jnp.asarray([[0.0, 637.0, 250.0]] * 2)
    t_action = jnp.concatenate([jnp.full((2, a), 421.0), jnp.full((2, a), 120.0)], axis=1)
    full = jitted_forward(cfg, params, i2v_model_input(noisy, condition), t_video, text, actions=noisy_actions,
                          t_action=t_action, proprio=proprio, image_embeddings=image,
                          history_latents=i2v_model_input(clean, condition), history_actions=clean_actions)

    geometry = kv.ChunkGeometry.for_model(cfg, (H, W), num_chunks, views=VIEWS)
    options = SamplerOptions(cfg_scale=2.0)
    state = kv.start_rollout(cfg, geometry, options, params, clean[:, :1], text, proprio, (condition, image))
    chunk_pass = jax.jit(kv._chunk_pass, static_argnums=(0, 1, 2))

    def run(state, k, latents, t, actions, t_a):  # chunk k of the given inputs against the cache
        return chunk_pass(cfg, geometry, options, params, state, jnp.int32(k), latents[:, k : k + 1],
                          t[:, k : k + 1], actions[:, (k - 1) * a : k * a], t_a[:, (k - 1) * a : k * a])

    outs = {1: run(state, 1, noisy, t_video, noisy_actions, t_action)}
    # Chunk 1 observed: its clean views and executed actions cached at t=0 (what observe_chunk writes).
    seen = run(state, 1, clean, jnp.zeros_like(t_video), clean_actions, jnp.zeros_like(t_action))
    offset = kv._chunk_offsets(cfg, geometry, 1)[0]
    state = state._replace(cache=write_chunk(state.cache, seen.keys, seen.values, offset))
    outs[2] = run(state, 2, noisy, t_video, noisy_actions, t_action)
    for k, out in outs.items():
        assert out.video.shape == (4, 1, VIEWS, H, W, 16)
        np.testing.assert_allclose(out.video[:2], full.video[:, k : k + 1], atol=1e-4, err_msg=f"chunk {k}")
        np.testing.assert_allclose(out.actions[:2], full.actions[:, (k - 1) * a : k * a], atol=1e-4,
                                   err_msg=f"chunk {k}")


def test_policy_and_server_with_three_cameras():
    """A tokens-layout policy on three cameras: infer and a server round trip with a third camera key
    (`extra_images`); a missing camera key is named."""
    from wamjax.diffusion.sampler import SamplerOptions
    from wamjax.inference.policy import Policy
    from wamjax.serving.client import PolicyClient, ServerError
    from wamjax.serving.observations import ObservationSchema
    from wamjax.serving.serve import PolicyServer

    config = get_config("size=tiny,stage=action_tune")
    config.data.cameras = "primary,wrist,exterior_image_2_left"
    config.data.view_layout = "tokens"
    config.model.attention_layout = "chunk_causal"
    cfg = model_config_from_run(config)
    frames = 1 + (config.data.num_frames - 1) // 4
    params = _with_view_embedding(jitted_init(cfg, jax.random.key(8), (frames, VIEWS, H, W, 16), TEXT_LEN,
                                              config.data.num_frames - 1))
    policy = Policy(config, params, {}, options=SamplerOptions(num_steps=1))
    assert policy.metadata["cameras"] == VIEWS and policy.metadata["view_layout"] == "tokens"
    rng = np.random.default_rng(0)
    camera = lambda *shape: rng.integers(0, 255, shape, np.uint8)
    cams = [camera(48, 64, 3), camera(24, 24, 3), camera(32, 32, 3)]
    assert policy.prepare_frames(cams).shape == (1, VIEWS, 32, 32, 3)  # every view at the full resolution
    policy._rng = jax.random.key(1)
    a = policy.infer(cams, np.zeros(8, np.float32), "pick")["actions"]  # compiled once, as the server calls it
    assert a.shape == (8, 7) and np.all(np.isfinite(a))
    policy._rng = jax.random.key(1)
    b = policy.infer([cams[0], cams[1], 255 - cams[2]], np.zeros(8, np.float32), "pick")["actions"]
    assert not np.allclose(a, b)  # the third camera reaches the model
    with pytest.raises(ValueError, match=r"2 camera images; this policy reads 3 cameras \['primary', 'wrist', 'ext"):
        policy.infer(cams[:2], None, "pick")

    with pytest.raises(ValueError, match=r"reads 3 cameras \['primary', 'wrist', 'exterior_image_2_left'\].*"
                                         r"names 2 camera keys"):
        PolicyServer(policy, port=0)
    server = PolicyServer(policy, schema=ObservationSchema(extra_images=("observation/image_2",)), port=0)
    server.start_in_thread()
    try:
        obs = {"observation/image": cams[0], "observation/wrist_image": cams[1], "observation/image_2": cams[2],
               "observation/state": np.zeros(7, np.float32), "prompt": "pick"}
        with PolicyClient(port=server.port) as client:
            assert client.metadata["camera_names"] == ["primary", "wrist", "exterior_image_2_left"]
            assert "observation/image_2" in client.metadata["observation_keys"]
            actions = client.infer(obs)["actions"]
            assert actions.shape == (8, 7) and np.all(np.isfinite(actions))
            del obs["observation/image_2"]
            with pytest.raises(ServerError, match=r"missing key 'observation/image_2': this policy reads 3 cameras"):
                client.infer(obs)
    finally:
        server.stop()


def test_export_carries_the_view_embedding_to_the_torch_reference(tmp_path):
    """write_wam puts `view_embedding` next to the diffusers backbone; torch_wam runs three views
    ([B, C, F, V, H, W]) as the JAX model does, and import_wam gives the parameters back."""
    import torch

    from wamjax.export import to_torch
    from wamjax.export.torch_wam import WorldActionModel as TorchWam

    cfg = ModelConfig.from_dict(SIZES["tiny"])
    params = _with_view_embedding(jitted_init(cfg, jax.random.key(0), (2, VIEWS, H, W, 16), TEXT_LEN, 4))
    to_torch.write_wam(str(tmp_path), cfg, jax.tree.map(np.asarray, params))
    _, back = to_torch.import_wam(str(tmp_path))
    np.testing.assert_array_equal(back["view_embedding"], params["view_embedding"])
    model = TorchWam.from_pretrained(str(tmp_path))
    assert tuple(model.view_embedding.shape) == (VIEWS, cfg.dim)
    r = np.random.default_rng(1)
    latents = r.standard_normal((2, 2, VIEWS, H, W, 16)).astype(np.float32)
    text = r.standard_normal((2, TEXT_LEN, 32)).astype(np.float32)
    actions, proprio = r.standard_normal((2, 4, 7)).astype(np.float32), np.zeros((2, 8), np.float32)
    t = np.full((2,), 500.0, np.float32)
    ref = jitted_forward(cfg, params, latents, t, text, actions=actions, t_action=t, proprio=proprio)
    with torch.no_grad():
        video, act = model(torch.from_numpy(latents).permute(0, 5, 1, 2, 3, 4), torch.from_numpy(t),
                           torch.from_numpy(text), torch.from_numpy(actions), torch.from_numpy(t),
                           torch.from_numpy(proprio))
    np.testing.assert_allclose(video.permute(0, 2, 3, 4, 5, 1).numpy(), ref.video, atol=1e-4)
    np.testing.assert_allclose(act.numpy(), ref.actions, atol=1e-4)
    with pytest.raises(ValueError, match=r"this export expects \[B, C, F, 3, H, W\] \(3 views\)"):
        model(torch.zeros(1, 16, 2, H, W), 0.0, torch.from_numpy(text[:1]))


def test_flops_count_every_view():
    from wamjax.flops.analytic import SequenceShape, token_counts
    from wamjax.flops.stage import train_step_flops
    from wamjax.stages import stage_spec

    config = get_config("size=tiny,stage=action_tune")
    single = train_step_flops(stage_spec(config, "action_tune"))
    config.stages.action_tune.cameras = "primary,wrist,exterior_image_2_left"
    tiled = train_step_flops(stage_spec(config, "action_tune"))
    config.data.view_layout = "tokens"
    tokens = train_step_flops(stage_spec(config, "action_tune"))
    assert tiled.video_tokens == single.video_tokens and tiled.frozen_per_step == single.frozen_per_step
    assert tokens.video_tokens == VIEWS * single.video_tokens
    assert tokens.frozen_components["vae_encoder"] == VIEWS * single.frozen_components["vae_encoder"]
    assert tokens.components["patch_embedding"] == VIEWS * single.components["patch_embedding"]
    # Teacher-forced, the clean history copy counts every view of each history frame too.
    cfg = ModelConfig.from_dict({**SIZES["tiny"], "attention_layout": "chunk_causal"})
    kwargs = dict(mode="joint", num_frames=9, resolution=(32, 32), text_length=TEXT_LEN)
    one, three = (token_counts(cfg, SequenceShape(**kwargs, views=v)) for v in (1, VIEWS))
    assert three.teacher_forcing and three.history_video == VIEWS * one.history_video > 0
    assert three.history_action == one.history_action
    assert three.sequence - one.sequence == (VIEWS - 1) * (one.video + one.history_video)
