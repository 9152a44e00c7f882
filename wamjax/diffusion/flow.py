"""Rectified flow matching as Wan trains it: x_t = (1 - t) * x0 + t * noise, velocity target noise - x0.

t lives in [0, 1] (1 = pure noise); the model reads `t * NUM_TRAIN_TIMESTEPS` as its timestep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_TRAIN_TIMESTEPS = 1000.0


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """Wan's timestep shift: t' = shift * t / (1 + (shift - 1) * t); shift > 1 spends more steps at high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


TIME_SAMPLINGS = ("uniform", "logit_normal", "beta")


def check_time_sampling(sampling: str, key: str = "diffusion.time_sampling") -> None:
    """Raises naming `key` unless `sampling` is one of TIME_SAMPLINGS."""
    if sampling not in TIME_SAMPLINGS:
        raise ValueError(f"{key}={sampling!r}; expected one of {TIME_SAMPLINGS}")


def sample_time(rng: jax.Array, shape: tuple[int, ...], sampling: str = "uniform", shift: float = 1.0,
                logit_mean: float = 0.0, logit_std: float = 1.0, beta_a: float = 3.0, beta_b: float = 1.0,
                key: str = "diffusion.time_sampling") -> jax.Array:
    """Draws training times in (0, 1): `uniform`, `logit_normal` or `beta` (Beta(beta_a, beta_b)), then shifted.

    t = 1 is pure noise, so Beta(3, 1) (mean 0.75) favours high noise, as DreamZero-Flash trains its video.
    """
    check_time_sampling(sampling, key)
    if sampling == "uniform":
        t = jax.random.uniform(rng, shape, minval=1e-5, maxval=1.0)
    elif sampling == "logit_normal":
        t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, shape))
    else:
        t = jnp.clip(jax.random.beta(rng, beta_a, beta_b, shape), 1e-5, 1.0)
    return shift_time(t, shift)


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t for t broadcast from the leading axes of x0."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim))
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching regression target."""
    return noise - x0


def to_model_timestep(t: jax.Array) -> jax.Array:
    """[0, 1] flow time -> the model's 0..1000 timestep."""
    return t * NUM_TRAIN_TIMESTEPS


def sampling_schedule(num_steps: int, shift: float = 1.0) -> jax.Array:
    """Decreasing times t_0 = 1 > ... > t_N = 0 for an N-step Euler sampler, with Wan's shift."""
    t = jnp.linspace(1.0, 0.0, num_steps + 1)
    return shift_time(t, shift)
