"""Loading ml_collections config files the way `--config=path:arg` does, for scripts, tests and configs."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import ml_collections

CHECKOUT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(path: str) -> ModuleType:
    """Executes a config file as a fresh module (a relative path may also be relative to the checkout)."""
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(CHECKOUT_ROOT, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    name = "_wamjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(spec: str) -> ml_collections.ConfigDict:
    """`configs/wam.py:size=tiny,stage=all` -> that file's get_config("size=tiny,stage=all")."""
    path, _, arg = spec.partition(":")
    module = load_config_module(path)
    return module.get_config(arg) if arg else module.get_config()
