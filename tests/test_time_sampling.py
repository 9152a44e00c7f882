"""Training-time distributions per modality (uniform, logit-normal, Beta) and a model trained with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import get_config

from wamjax.diffusion import flow
from wamjax.diffusion.sampler import SamplerOptions, sample
from wamjax.diffusion.time_sampling import check_diffusion_config, sample_chunk_times
from wamjax.models.config import model_config_from_run
from wamjax.models.vae import vae_config_for
from wamjax.models.wam import init_params
from wamjax.train.optimizer import make_optimizer
from wamjax.train.step import StepSpec, TrainState, example_rngs, make_train_step

N = 100_000


@pytest.mark.parametrize("sampling,a,b,mean,var", [
    ("uniform", 0, 0, 0.5, 1 / 12),
    ("beta", 3.0, 1.0, 0.75, 3 / 80),  # DreamZero-Flash's video time: Beta(3, 1), mean 0.75 (t = 1 is noise)
    ("beta", 2.0, 5.0, 2 / 7, 10 / 392),
])  # fmt: skip
def test_time_distribution_moments(sampling, a, b, mean, var):
    t = np.asarray(flow.sample_time(jax.random.key(0), (N,), sampling, 1.0, beta_a=a, beta_b=b))
    assert 0.0 < t.min() and t.max() <= 1.0
    assert t.mean() == pytest.approx(mean, abs=3e-3)
    assert t.var() == pytest.approx(var, rel=3e-2)


def test_logit_normal_is_symmetric_about_one_half_and_shift_moves_mass_to_noise():
    t = np.asarray(flow.sample_time(jax.random.key(1), (N,), "logit_normal", 1.0))
    assert t.mean() == pytest.approx(0.5, abs=3e-3) and np.median(t) == pytest.approx(0.5, abs=5e-3)
    shifted = np.asarray(flow.sample_time(jax.random.key(1), (N,), "logit_normal", 5.0))
    assert shifted.mean() > 0.7


def test_video_and_action_times_follow_their_own_distributions():
    d = get_config("size=tiny,stage=action_tune").diffusion
    d.shift, d.video_time_sampling, d.action_time_sampling = 1.0, "beta", "uniform"
    chunks = np.zeros(1, np.int32)
    video = np.asarray(sample_chunk_times(example_rngs(jax.random.key(2), N), chunks, d, "video"))
    action = np.asarray(sample_chunk_times(example_rngs(jax.random.key(3), N), chunks, d, "action"))
    assert video.mean() == pytest.approx(0.75, abs=3e-3) and action.mean() == pytest.approx(0.5, abs=3e-3)
    d.video_time_sampling = ""  # falls back to the shared time_sampling (logit-normal)
    video = np.asarray(sample_chunk_times(example_rngs(jax.random.key(2), N), chunks, d, "video"))
    assert video.mean() == pytest.approx(0.5, abs=3e-3)


@pytest.mark.parametrize("key,value,message", [
    ("video_time_sampling", "betta", "diffusion.video_time_sampling='betta'"),
    ("action_time_sampling", "normal", "diffusion.action_time_sampling='normal'"),
    ("time_sampling", "gauss", "diffusion.time_sampling='gauss'"),
    ("beta_a", 0.0, "diffusion.beta_a=0.0"),
])  # fmt: skip
def test_bad_time_sampling_is_named(key, value, message):
    d = get_config("size=tiny,stage=action_tune").diffusion
    d[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_diffusion_config(d)


def test_one_step_action_sampler_on_a_model_trained_with_beta_video_time():
    config = get_config("size=tiny,stage=action_tune")
    config.diffusion.video_time_sampling = "beta"  # DreamZero-Flash: video skewed to high noise
    config.diffusion.action_time_sampling = "uniform"
    cfg = model_config_from_run(config)
    batch, frames, num_actions, text_len = 2, 3, 8, config.text.max_length
    r = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    data = {
        "latents": f32(batch, frames, 4, 4, 16), "actions": f32(batch, num_actions, cfg.action_dim),
        "action_mask": jnp.ones((batch, num_actions), bool), "proprio": f32(batch, cfg.proprio_dim),
        "text_embeddings": f32(batch, text_len, cfg.text_dim),
    }
    params = jax.jit(init_params, static_argnums=(0, 2, 3, 4))(
        cfg, jax.random.key(0), (frames, 4, 4, 16), text_len, num_actions
    )
    tx, schedule = make_optimizer(config.optim, learning_rate=3e-3, warmup_steps=0, total_steps=4, trainable="all")
    state = TrainState(step=jnp.asarray(0), params=params, opt_state=tx.init(params), ema_params=None,
                       rng=jax.random.key(1))
    spec = StepSpec(model=cfg, mode="joint", clean_context_frames=1, vae=vae_config_for("tiny"))
    train_step = jax.jit(make_train_step(spec, config.diffusion, tx, schedule, 0.0))
    losses = []
    for _ in range(4):
        state, metrics = train_step(state, data, None)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    args = (cfg, state.params, data["latents"][:, :1], data["text_embeddings"], data["proprio"],
            f32(batch, frames - 1, 4, 4, 16), f32(batch, num_actions, cfg.action_dim))
    one = sample(*args, options=SamplerOptions(num_steps=4, action_steps=1), stop_after_actions=True)
    many = sample(*args, options=SamplerOptions(num_steps=4, action_steps=4), stop_after_actions=True)
    assert one.actions.shape == (batch, num_actions, cfg.action_dim)
    assert bool(jnp.all(jnp.isfinite(one.actions)))
    assert float(jnp.abs(one.actions - many.actions).max()) > 1e-4
