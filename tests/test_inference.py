"""Inference: the Euler/CFG sampler, the KV-cached chunked rollout, and Policy on a real tiny checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import get_config

from data_pipelines.standardize.stats import normalize
from wamjax.diffusion import flow
from wamjax.diffusion.sampler import SamplerOptions, sample, step_times
from wamjax.inference import kv_cache as kv
from wamjax.inference.policy import Policy, select_dataset_stats, unnormalize
from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.wam import init_params, wam_forward

H = W = 4  # latent grid of the tiny VAE at 32x32
TEXT_LEN = 8
# Eager flax dispatch is slow on a shared 2-core CPU: compile the reference paths instead.
jitted_init = jax.jit(init_params, static_argnums=(0, 2, 3, 4))
jitted_forward = jax.jit(wam_forward, static_argnums=0)
jitted_commit = jax.jit(kv._commit, static_argnums=(0, 1, 2))
jitted_chunk_pass = jax.jit(kv._chunk_pass, static_argnums=(0, 1, 2))


def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny action_tune checkpoint trained 2 steps in-process; shared by the inference and serving tests."""
    from wamjax.train.loop import train

    root = tmp_path_factory.getbasetemp() / "policy_checkpoint"
    step_dir = root / "checkpoints" / "2"
    if not (root / "done").exists():
        config = get_config("size=tiny,stage=action_tune")
        config.train.steps = 2
        config.checkpoint.async_save = False
        config.data.batch_size = 8  # one clip per simulated device
        train(config, str(root))
        (root / "done").write_text("ok")
    return str(step_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def random_inputs(seed: int, batch: int, frames: int, actions: int, text_dim: int = 32):
    r = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return f32(batch, frames, H, W, 16), f32(batch, actions, 7), f32(batch, 8), f32(batch, TEXT_LEN, text_dim)


# --- Sampler ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def joint_model():
    cfg = ModelConfig.from_dict(SIZES["tiny"])
    return cfg, jitted_init(cfg, jax.random.key(0), (3, H, W, 16), TEXT_LEN, 8)


def test_step_times_hold_finished_modality_at_zero():
    t, t_next = step_times(2, 4, shift=3.0)
    np.testing.assert_allclose(t, [1.0, 0.75, 0.0, 0.0])
    np.testing.assert_allclose(t_next, [0.75, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(np.asarray(flow.sampling_schedule(2, 3.0))[:2], t[:2], rtol=1e-6)


def test_cfg_batched_equals_sequential_and_scale_one_is_conditional(joint_model):
    cfg, params = joint_model
    latents, actions, proprio, text = random_inputs(0, 2, 3, 8)
    args = (cfg, params, latents[:, :1], text, proprio, latents[:, 1:], actions)
    batched = sample(*args, options=SamplerOptions(num_steps=3, cfg_scale=3.0, cfg_batched=True))
    sequential = sample(*args, options=SamplerOptions(num_steps=3, cfg_scale=3.0, cfg_batched=False))
    np.testing.assert_allclose(batched.latents, sequential.latents, atol=1e-4)
    np.testing.assert_allclose(batched.actions, sequential.actions, atol=1e-4)
    plain = sample(*args, options=SamplerOptions(num_steps=3))
    assert float(jnp.abs(plain.actions - batched.actions).max()) > 1e-3  # guidance changed something

    # One step of the plain sampler is x1 - v(x1, t=1) by hand.
    one = sample(*args, options=SamplerOptions(num_steps=1))
    v = jitted_forward(cfg, params, latents, jnp.array([[0.0, 1000.0, 1000.0]] * 2), text, actions=actions,
                       t_action=jnp.full((2,), 1000.0), proprio=proprio)
    np.testing.assert_allclose(one.actions, actions - v.actions, atol=1e-5)
    np.testing.assert_allclose(one.latents[:, 1:], latents[:, 1:] - v.video[:, 1:], atol=1e-5)
    np.testing.assert_array_equal(one.latents[:, :1], latents[:, :1])  # context stays clean


def test_actions_finish_early_and_are_held_clean(joint_model):
    cfg, params = joint_model
    latents, actions, proprio, text = random_inputs(1, 1, 3, 8)
    args = (cfg, params, latents[:, :1], text, proprio, latents[:, 1:], actions)
    options = SamplerOptions(num_steps=4, action_steps=2)
    full = sample(*args, options=options)
    early = sample(*args, options=options, stop_after_actions=True)
    # Once the actions reach t=0 the later video steps must not move them.
    np.testing.assert_allclose(full.actions, early.actions, atol=1e-6)
    assert float(jnp.abs(full.latents - early.latents).max()) > 1e-3  # video kept denoising
    same_steps = sample(*args, options=SamplerOptions(num_steps=4))
    assert float(jnp.abs(same_steps.actions - full.actions).max()) > 1e-4


def test_sampler_rejects_bad_shapes_and_options(joint_model):
    cfg, params = joint_model
    latents, actions, proprio, text = random_inputs(2, 1, 3, 8)
    with pytest.raises(ValueError, match="video_noise has shape"):
        sample(cfg, params, latents[:, :1], text, proprio, latents[:, 1:, :2], actions, options=SamplerOptions())
    with pytest.raises(ValueError, match="num_steps=0"):
        SamplerOptions(num_steps=0)


# --- KV cache ----------------------------------------------------------------------------------------------

def causal_model(chunk_frames: int, num_chunks: int):
    cfg = ModelConfig.from_dict(
        {**SIZES["tiny"], "attention_layout": "chunk_causal", "chunk_latent_frames": chunk_frames}
    )
    frames, num_actions = 1 + num_chunks * chunk_frames, num_chunks * chunk_frames * cfg.action_frames_per_latent
    return cfg, jitted_init(cfg, jax.random.key(3), (frames, H, W, 16), TEXT_LEN, num_actions), frames, num_actions


@pytest.mark.parametrize("chunk_frames,num_chunks", [(1, 3), (2, 2)])
def test_cached_chunk_forward_equals_full_sequence_forward(chunk_frames, num_chunks):
    cfg, params, frames, num_actions = causal_model(chunk_frames, num_chunks)
    latents, actions, proprio, text = random_inputs(4, 2, frames, num_actions)
    a = num_actions // num_chunks
    last_frames = slice(1 + (num_chunks - 1) * chunk_frames, frames)
    last_actions = slice(num_actions - a, num_actions)
    # Earlier chunks clean, the newest one noisy, per frame / per action token.
    t_video = jnp.zeros((2, frames)).at[:, last_frames].set(637.0)
    t_action = jnp.zeros((2, num_actions)).at[:, last_actions].set(421.0)
    full = jitted_forward(cfg, params, latents, t_video, text, actions=actions, t_action=t_action, proprio=proprio)

    geometry = kv.ChunkGeometry.for_model(cfg, (H, W), num_chunks)
    options = SamplerOptions()
    state = kv.start_rollout(cfg, geometry, options, params, latents[:, :1], text, proprio)
    for j in range(1, num_chunks):
        fs = slice(1 + (j - 1) * chunk_frames, 1 + j * chunk_frames)
        state = jitted_commit(cfg, geometry, options, params, state, jnp.int32(j), latents[:, fs],
                           actions[:, (j - 1) * a : j * a])
    assert int(state.cache.length) == geometry.context_tokens(cfg) + (num_chunks - 1) * geometry.chunk_tokens(cfg)
    out = jitted_chunk_pass(cfg, geometry, options, params, state, jnp.int32(num_chunks), latents[:, last_frames],
                         t_video[:, last_frames], actions[:, last_actions], t_action[:, last_actions])
    np.testing.assert_allclose(out.video, full.video[:, last_frames], atol=1e-4)
    np.testing.assert_allclose(out.actions, full.actions[:, last_actions], atol=1e-4)


def test_kv_cache_rejects_bidirectional_models_and_bad_observations():
    with pytest.raises(ValueError, match="chunk_causal"):
        kv.ChunkGeometry.for_model(ModelConfig.from_dict(SIZES["tiny"]), (H, W), 2)
    cfg, params, frames, num_actions = causal_model(1, 2)
    latents, _, proprio, text = random_inputs(7, 1, frames, num_actions)
    rollout = kv.ChunkedRollout(cfg, params, kv.ChunkGeometry.for_model(cfg, (H, W), 2), SamplerOptions(num_steps=1))
    with pytest.raises(RuntimeError, match="before start"):
        rollout.generate(jax.random.key(0))
    rollout.start(latents[:, :1], text, proprio)
    with pytest.raises(RuntimeError, match="needs a generated chunk"):
        rollout.observe(latents[:, 1:2])
    rollout.generate(jax.random.key(0))
    with pytest.raises(ValueError, match=r"observed_latents have shape \(1, 2, 4, 4, 16\)"):
        rollout.observe(latents[:, 1:3])


# --- Normalization -----------------------------------------------------------------------------------------

STATS = {
    "mean": [0.1, -0.2, 0.0, 0.0, 0.0, 0.3, 0.5], "std": [2.0, 0.5, 1.0, 1.0, 1.0, 3.0, 1.0],
    "q01": [-1.0, -2.0, 0.0, -1.0, -1.0, -1.0, 0.0], "q99": [3.0, 2.0, 1.0, 1.0, 1.0, 5.0, 1.0],
    "mask": [True, True, True, True, True, True, False],
}


@pytest.mark.parametrize("method", ["bounds", "normal"])
def test_unnormalize_inverts_normalize_on_masked_dims(method):
    low, high = np.array(STATS["q01"]), np.array(STATS["q99"])
    raw = (low + np.random.default_rng(0).uniform(0.05, 0.95, (5, 7)) * (high - low)).astype(np.float32)
    back = unnormalize(normalize(raw, STATS, method), STATS, method)
    np.testing.assert_allclose(back, raw, atol=1e-5)
    with pytest.raises(ValueError, match="'minmax'"):
        unnormalize(raw, STATS, "minmax")


def test_select_dataset_stats_names_the_choices():
    stats = {"datasets": {"bridge": {"action": STATS}, "droid": {"action": STATS}}}
    assert select_dataset_stats(stats, "droid")["action"] is STATS
    with pytest.raises(ValueError, match=r"\['bridge', 'droid'\]"):
        select_dataset_stats(stats, None)
    with pytest.raises(KeyError, match="'taco'"):
        select_dataset_stats(stats, "taco")
    assert select_dataset_stats({}, None) is None


# --- Policy on a real checkpoint -----------------------------------------------------------------------------

def test_policy_from_checkpoint_jits_once_per_shape(checkpoint):
    policy = Policy.from_checkpoint(checkpoint, num_steps=2, cfg_scale=2.0, seed=0)
    frame = np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8)  # resized to 32x32
    out = policy.infer(frame, np.zeros(8, np.float32), "synthetic: lift the block", return_latents=True)
    assert out["actions"].shape == (8, 7) and out["actions"].dtype == np.float32
    assert out["latents"].shape == (3, H, W, 16)
    assert np.all(np.isfinite(out["actions"]))
    for _ in range(2):
        policy.infer(frame, np.ones(6, np.float32), "another instruction", return_latents=True)
    assert policy.num_traces == 1
    policy.infer(frame, None, "x")  # actions only: a second compiled shape, then no more
    policy.infer(frame, None, "x")
    assert policy.num_traces == 2

    # Same seed and inputs -> same chunk; the context latent is the VAE encoding of the frame.
    again = Policy.from_checkpoint(checkpoint, num_steps=2, cfg_scale=2.0, seed=0)
    out2 = again.infer(frame, np.zeros(8, np.float32), "synthetic: lift the block", return_latents=True)
    np.testing.assert_allclose(out2["actions"], out["actions"], atol=1e-6)


def test_policy_unnormalizes_with_checkpoint_stats_and_checks_inputs(checkpoint):
    from wamjax.checkpoint.load import load_checkpoint

    run_config, params = load_checkpoint(checkpoint)
    proprio_stats = {k: v + [0.0] for k, v in STATS.items() if k != "mask"} | {"mask": [True] * 7 + [False]}
    stats = {"datasets": {"bridge": {"action": STATS, "proprio": proprio_stats}}}
    plain = Policy(run_config, params, {}, options=SamplerOptions(num_steps=1), seed=3)
    with_stats = Policy(run_config, params, stats, options=SamplerOptions(num_steps=1), seed=3)
    frame = np.zeros((32, 32, 3), np.uint8)
    proprio = np.zeros(8, np.float32)
    # Normalized proprio differs, so compare with proprio given as already-normalized zeros in both.
    raw_proprio = unnormalize(proprio, stats["datasets"]["bridge"]["proprio"], "normal")  # as windowing does
    a = plain.infer(frame, proprio, "go")["actions"]
    b = with_stats.infer(frame, raw_proprio, "go")["actions"]
    np.testing.assert_allclose(b, unnormalize(a, STATS, "bounds"), atol=1e-4)
    assert not np.allclose(a, b)

    with pytest.raises(TypeError, match="dtype float32; expected uint8"):
        plain.infer(frame.astype(np.float32), proprio, "go")
    with pytest.raises(ValueError, match=r"frames have shape \(32, 32\)"):
        plain.infer(frame[..., 0], proprio, "go")
    with pytest.raises(ValueError, match="2 context frames"):
        plain.infer(np.stack([frame, frame]), proprio, "go")
    with pytest.raises(ValueError, match=r"proprio has shape \(9,\)"):
        plain.infer(frame, np.zeros(9), "go")
    with pytest.raises(TypeError, match="instruction is int"):
        plain.infer(frame, proprio, 5)
    assert os.path.isdir(checkpoint)


def test_closed_loop_session_with_teacher_forcing_and_reanchoring():
    config = get_config("size=tiny,stage=action_tune")
    config.model.attention_layout = "chunk_causal"
    cfg = ModelConfig.from_dict({**config.model.to_dict(), "proprio_dim": config.data.proprio_dim})
    params = jitted_init(cfg, jax.random.key(8), (3, H, W, 16), TEXT_LEN, 8)
    policy = Policy(config, params, {}, options=SamplerOptions(num_steps=2))
    rng = np.random.default_rng(9)
    frame = rng.integers(0, 255, (32, 32, 3), np.uint8)
    session = policy.start_rollout(frame, np.zeros(8, np.float32), "synthetic: move the block left")
    assert session.geometry.max_chunks == 2  # the trained clip: 1 context + 2 latent frames
    chunks = []
    for _ in range(3):  # the third chunk starts a fresh cache from the newest real frame
        actions = session.next_actions()
        assert actions.shape == (4, 7) and np.all(np.isfinite(actions))
        chunks.append(actions)
        with pytest.raises(RuntimeError, match="twice without observe"):
            session.next_actions()
        session.observe(rng.integers(0, 255, (4, 48, 48, 3), np.uint8))  # any camera size is resized
    assert session.rollout.num_chunks == 1
    assert not np.allclose(chunks[0], chunks[1])
    with pytest.raises(ValueError, match=r"observed frames have shape \(3, 32, 32, 3\); expected \[4, H, W, 3\]"):
        session.observe(np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="chunk_causal"):
        Policy(get_config("size=tiny,stage=action_tune"), params, {}).start_rollout(frame, None, "x")
    # Trained with one state per chunk: each observed state is the next chunk's state token, not only kept for
    # re-anchoring (same rng, same frames, another state -> other actions for chunk 2, same for chunk 1).
    config.data.proprio_chunk_frames = 4
    observed = rng.integers(0, 255, (4, 32, 32, 3), np.uint8)
    runs = []
    for state in (np.zeros(8, np.float32), np.ones(8, np.float32)):
        session = Policy(config, params, {}, options=SamplerOptions(num_steps=2)).start_rollout(
            frame, np.zeros(8, np.float32), "synthetic: move the block left")
        assert session.geometry.proprio_per_chunk
        first = session.next_actions()
        session.observe(observed, state)
        runs.append((first, session.next_actions()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], atol=1e-6)
    assert not np.allclose(runs[0][1], runs[1][1], atol=1e-4)


def teacher_forced_model():
    """A tiny chunk-causal (teacher-forced) joint model and an observation: (config, params, frame, proprio, prompt)."""
    config = get_config("size=tiny,stage=action_tune")
    config.model.attention_layout = "chunk_causal"
    cfg = ModelConfig.from_dict({**config.model.to_dict(), "proprio_dim": config.data.proprio_dim})
    assert cfg.history == "teacher_forcing"
    params = jitted_init(cfg, jax.random.key(8), (3, H, W, 16), TEXT_LEN, 8)
    frame = np.random.default_rng(3).integers(0, 255, (32, 32, 3), np.uint8)
    return config, params, frame, np.full(8, 0.5, np.float32), "synthetic: move the block left"


def test_infer_denoises_a_teacher_forced_model_chunk_by_chunk():
    """A teacher-forced model never saw noisy history in training: `infer` denoises its chunks one after another,
    each against the cached clean predictions before it (a diffusion-forcing model keeps the one-shot sampler)."""
    config, params, frame, proprio, prompt = teacher_forced_model()
    make = lambda config: Policy(config, params, {}, options=SamplerOptions(num_steps=2), seed=4)
    policy = make(config)
    out = policy.infer(frame, proprio, prompt, return_latents=True)
    assert out["actions"].shape == (8, 7) and out["latents"].shape == (3, H, W, 16)
    assert policy.num_traces == 0  # the one-shot policy step never ran
    # The same as driving the KV-cache session by hand, keeping each chunk's prediction as its history.
    session = make(config).start_rollout(frame, proprio, prompt)
    first = session.next_actions()
    first_latents = np.asarray(session.last_latents[0], np.float32)
    session.keep_prediction()
    with pytest.raises(RuntimeError, match="without a generated chunk"):
        session.keep_prediction()
    second = session.next_actions()
    np.testing.assert_allclose(out["actions"], np.concatenate([first, second]), atol=1e-6)
    np.testing.assert_allclose(out["latents"][1:2], first_latents, atol=1e-5)
    np.testing.assert_allclose(out["latents"][2:], np.asarray(session.last_latents[0], np.float32), atol=1e-5)
    np.testing.assert_allclose(out["latents"][:1], np.asarray(session.context_latents[0], np.float32), atol=1e-5)
    # A diffusion-forcing model was trained on noisy history: it keeps the one-shot sampler.
    config.model.history = "diffusion_forcing"
    policy = make(config)
    assert policy.infer(frame, proprio, prompt)["actions"].shape == (8, 7)
    assert policy.num_traces == 1


def test_imagine_runs_a_teacher_forced_model_chunk_by_chunk():
    """World model on a teacher-forced model: each chunk's frames are denoised against the clean chunks before
    it, with that chunk's own actions held clean."""
    config = get_config("size=tiny,stage=action_tune")
    config.model.attention_layout = "chunk_causal"
    cfg = ModelConfig.from_dict({**config.model.to_dict(), "proprio_dim": config.data.proprio_dim})
    params = jitted_init(cfg, jax.random.key(8), (3, H, W, 16), TEXT_LEN, 8)
    frame = np.random.default_rng(3).integers(0, 255, (32, 32, 3), np.uint8)
    actions = np.random.default_rng(4).uniform(-1, 1, (8, 7)).astype(np.float32)
    make = lambda: Policy(config, params, {}, options=SamplerOptions(num_steps=2), seed=4)
    policy = make()
    out = policy.imagine(frame, actions, "synthetic: move the block left")
    assert out["latents"].shape == (3, H, W, 16) and out["frames"].shape == (9, 32, 32, 3)
    assert out["frames"].dtype == np.uint8 and policy.num_traces == 0  # the one-shot sampler never ran
    # Other actions for the second chunk only: the first chunk's frames stay, the second's change.
    changed = actions.copy()
    changed[4:] = -changed[4:]
    other = make().imagine(frame, changed, "synthetic: move the block left")
    np.testing.assert_allclose(other["latents"][:2], out["latents"][:2], atol=1e-5)
    assert not np.allclose(other["latents"][2], out["latents"][2], atol=1e-4)
    # Other actions for the first chunk change its frames, and the second chunk's through the cache.
    changed = actions.copy()
    changed[:4] = -changed[:4]
    first = make().imagine(frame, changed, "synthetic: move the block left")
    assert not np.allclose(first["latents"][1], out["latents"][1], atol=1e-4)
    with pytest.raises(ValueError, match=r"actions have shape \(7, 7\)"):
        make().imagine(frame, actions[:7], "x")
