"""train.compilation_cache_dir and its kin: JAX's persistent compilation cache, on by default."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from wamjax.compilation_cache import CACHE_SUBDIR, enable_compilation_cache, user_cache_dir


@pytest.fixture
def restore_jax_cache():
    saved = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")}
    yield
    jax_cache.reset_cache()
    for name, value in saved.items():
        jax.config.update(name, value)


def test_settings_name_where_the_cache_goes_and_a_compile_lands_there(tmp_path, monkeypatch, restore_jax_cache):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # A directory JAX already has (here the test session's) is kept by the default.
    current = jax.config.jax_compilation_cache_dir
    if current:
        assert enable_compilation_cache("", tmp_path) == current
    # Without one, training's default is WORKDIR/compilation_cache, inference's the user's cache directory.
    jax.config.update("jax_compilation_cache_dir", None)
    assert enable_compilation_cache("", tmp_path / "run") == str(tmp_path / "run" / CACHE_SUBDIR)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert enable_compilation_cache("") == user_cache_dir() == str(tmp_path / "xdg" / "wamjax" / CACHE_SUBDIR)
    # An explicit directory, opened by the next compile even though JAX already decided on a cache.
    chosen = str(tmp_path / "chosen")
    assert enable_compilation_cache(chosen) == chosen == jax.config.jax_compilation_cache_dir
    n = int(time.time() * 1000) % 89 + 7  # a shape this session has not compiled
    jax.jit(lambda x: jnp.tanh(x) * n)(jnp.ones((n, 3))).block_until_ready()
    assert os.listdir(chosen)
    assert enable_compilation_cache("off") is None and not jax.config.jax_enable_compilation_cache
    assert enable_compilation_cache(chosen) == chosen and jax.config.jax_enable_compilation_cache
