"""JAX's persistent compilation cache, on by default: a restarted job loads its executables instead of compiling.

One setting (`train.compilation_cache_dir` for training; `--compilation_cache_dir` for the server; the keyword of
`Policy.from_checkpoint`):
  ""        the default: a cache directory JAX already has (`JAX_COMPILATION_CACHE_DIR`, or one set in code)
            is kept; otherwise WORKDIR/compilation_cache for training, and the user's cache directory
            (`$XDG_CACHE_HOME/wamjax/compilation_cache`, `~/.cache/...`) for inference and serving.
  "off"     no persistent cache (JAX's own setting is turned off too).
  a path    that directory, local or a URI (gs://... through etils.epath, as JAX's cache reads it).

Several processes on CPU (gloo collectives) get no default cache: JAX's cache keeps process 0's executables
only, so on a restart process 1 alone compiles while process 0 waits at the first collective, past gloo's
rendezvous timeout. An explicit directory is used there as anywhere.
"""

from __future__ import annotations

import os

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from wamjax.paths import PathLike, as_path

OFF = "off"
CACHE_SUBDIR = "compilation_cache"


def user_cache_dir() -> str:
    """$XDG_CACHE_HOME/wamjax/compilation_cache (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "wamjax", CACHE_SUBDIR)


def enable_compilation_cache(setting: str, workdir: PathLike | None = None) -> str | None:
    """Points JAX's persistent compilation cache at `setting` (module docstring); returns the directory in use.

    `workdir` is the default's parent for training; None takes the user's cache directory.
    """
    setting = str(setting or "").strip()
    current = jax.config.jax_compilation_cache_dir
    if setting.lower() == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("compilation cache: off")
        return None
    if not setting:
        if current:
            return current
        if jax.process_count() > 1 and jax.default_backend() == "cpu":
            logging.info("compilation cache: none by default on several CPU processes (see "
                         "wamjax.compilation_cache); set train.compilation_cache_dir to use one")
            return None
        setting = str(as_path(workdir) / CACHE_SUBDIR) if workdir is not None else user_cache_dir()
    else:
        setting = str(as_path(setting))
    if setting != current or not jax.config.jax_enable_compilation_cache:
        # JAX decides once per process whether a cache is in use (at its first compile, which may have come
        # before this call): reset, so that the next compile opens this directory.
        compilation_cache.reset_cache()
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.set_cache_dir(setting)
    logging.info("compilation cache: %s", setting)
    return setting
