"""Teacher forcing end to end: a chunk-causal model trained teacher-forced for a few steps; its KV-cached
closed-loop rollout, with a new robot state per chunk, equals the full teacher-forced forward pass on the same
noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_utils import get_config

from wamjax.diffusion.sampler import SamplerOptions, step_times
from wamjax.inference import kv_cache as kv
from wamjax.models import vae as vae_lib
from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.wam import init_params, wam_forward
from wamjax.train.step import StepSpec, TrainState, make_train_step

H = W = 4
TEXT_LEN = 8
CHUNKS = 3
FRAMES = 1 + CHUNKS  # one latent frame per chunk
ACTIONS = 4 * CHUNKS
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _trained_model():
    """A tiny chunk-causal model (model.history defaults to teacher_forcing) after 2 real Adam steps."""
    config = get_config("size=tiny,stage=action_tune")
    cfg = ModelConfig.from_dict({**SIZES["tiny"], "attention_layout": "chunk_causal", "chunk_latent_frames": 1})
    assert cfg.history == "teacher_forcing"
    spec = StepSpec(model=cfg, mode="joint", clean_context_frames=1, vae=vae_lib.vae_config_for("tiny"))
    tx = optax.apply_if_finite(optax.adam(1e-3), max_consecutive_errors=5)
    step = jax.jit(make_train_step(spec, config.diffusion, tx, optax.constant_schedule(1e-3), 0.0),
                   compiler_options=FAST_COMPILE)
    params = jax.jit(init_params, static_argnums=(0, 2, 3, 4))(cfg, jax.random.key(0), (FRAMES, H, W, 16), TEXT_LEN,
                                                                ACTIONS)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=None,
                       rng=jax.random.key(1))
    r = np.random.default_rng(0)
    batch = {
        "latents": r.standard_normal((4, FRAMES, H, W, 16)).astype(np.float32),
        "text_embeddings": r.standard_normal((4, TEXT_LEN, cfg.text_dim)).astype(np.float32),
        "actions": r.uniform(-1, 1, (4, ACTIONS, cfg.action_dim)).astype(np.float32),
        "proprio": r.uniform(-1, 1, (4, 1 + CHUNKS, cfg.proprio_dim)).astype(np.float32),  # one state per chunk
        "action_mask": np.ones((4, ACTIONS), bool),
    }
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch, None)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and int(metrics["update_skipped"]) == 0
    return cfg, state.params


def test_cached_rollout_equals_full_teacher_forced_forward():
    cfg, params = _trained_model()
    options = SamplerOptions(num_steps=3, action_steps=2, cfg_scale=2.5)
    r = np.random.default_rng(1)
    f32 = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)
    context, text, state0 = f32(2, 1, H, W, 16), f32(2, TEXT_LEN, cfg.text_dim), f32(2, cfg.proprio_dim)
    noises = [(f32(2, 1, H, W, 16), f32(2, 4, cfg.action_dim)) for _ in range(CHUNKS)]
    observed = [(f32(2, 1, H, W, 16), f32(2, cfg.proprio_dim)) for _ in range(CHUNKS)]

    # Closed loop: generate a chunk, execute its actions, observe the real frame (it replaces the prediction)
    # and the robot's state, which the next chunk reads as its state token.
    geometry = kv.ChunkGeometry.for_model(cfg, (H, W), CHUNKS, proprio_per_chunk=True)
    rollout = kv.ChunkedRollout(cfg, params, geometry, options)
    rollout.start(context, text, state0)
    cached = []
    for noise, (real, state) in zip(noises, observed, strict=True):
        cached.append(rollout.generate_from(*noise))
        rollout.observe(real, state)
    assert rollout.full
    with pytest.raises(RuntimeError, match=f"max_chunks={CHUNKS}"):
        rollout.generate(jax.random.key(0))

    # One teacher-forced sequence for all chunks at once: the clean history is what the rollout cached (the
    # observed frames, the executed actions); every noisy chunk takes the same Euler steps from the same noise.
    history_latents = jnp.concatenate([context, *(v for v, _ in observed)], axis=1)
    # Chunk 0 and chunk 1 read the state at the context frame; chunk k + 1 the state observed after chunk k.
    proprio = jnp.stack([state0, state0, *(s for _, s in observed[:-1])], axis=1)
    history_actions = jnp.concatenate([a for _, a in cached], axis=1)
    x = jnp.concatenate([context, *(v for v, _ in noises)], axis=1)
    y = jnp.concatenate([a for _, a in noises], axis=1)
    n = options.num_iterations
    tv, tv_next = step_times(options.num_steps, n, options.shift)
    ta, ta_next = step_times(options.resolved_action_steps, n, options.shift)
    forward = jax.jit(wam_forward, static_argnums=0)

    def guided(x, y, i, history_latents=history_latents, proprio=proprio):
        t_video = jnp.zeros((2, FRAMES)).at[:, 1:].set(tv[i] * 1000)
        t_action = jnp.full((2, ACTIONS), ta[i] * 1000)
        cond, null = (forward(cfg, params, x, t_video, words, actions=y, t_action=t_action, proprio=proprio,
                              history_latents=history_latents, history_actions=history_actions)
                      for words in (text, jnp.zeros_like(text)))
        s = options.cfg_scale
        return null.video + s * (cond.video - null.video), null.actions + s * (cond.actions - null.actions)

    for i in range(n):
        v_video, v_actions = guided(x, y, i)
        x = x.at[:, 1:].add((tv_next[i] - tv[i]) * v_video[:, 1:])
        y = y + (ta_next[i] - ta[i]) * v_actions
    for k, (video, actions) in enumerate(cached):
        np.testing.assert_allclose(video, x[:, 1 + k : 2 + k], atol=1e-5, err_msg=f"chunk {k + 1} video")
        np.testing.assert_allclose(actions, y[:, 4 * k : 4 * (k + 1)], atol=1e-5, err_msg=f"chunk {k + 1} actions")
    # The clean history is read: another observed frame 1 moves chunks 2 and 3, not chunk 1.
    moved = guided(x, y, 0, history_latents.at[:, 1].add(1.0))[0]
    same = guided(x, y, 0)[0]
    np.testing.assert_allclose(moved[:, 1], same[:, 1], atol=1e-5)
    assert float(jnp.abs(moved[:, 2] - same[:, 2]).max()) > 1e-3
    assert float(jnp.abs(moved[:, 3] - same[:, 3]).max()) > 1e-3
    # Chunk 2's state token is read by chunk 2 alone: another state there moves its frame and actions only.
    moved, moved_actions = guided(x, y, 0, proprio=proprio.at[:, 2].add(1.0))
    same_actions = guided(x, y, 0)[1]
    for k in (1, 3):
        np.testing.assert_allclose(moved[:, k], same[:, k], atol=1e-5, err_msg=f"chunk {k} video")
        np.testing.assert_allclose(moved_actions[:, 4 * (k - 1) : 4 * k], same_actions[:, 4 * (k - 1) : 4 * k],
                                   atol=1e-5, err_msg=f"chunk {k} actions")
    assert float(jnp.abs(moved[:, 2] - same[:, 2]).max()) > 1e-3
    assert float(jnp.abs(moved_actions[:, 4:8] - same_actions[:, 4:8]).max()) > 1e-3
