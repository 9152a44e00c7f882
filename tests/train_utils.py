"""Helpers for tests that run the real trainer (in-process or as `python -m wamjax.main`)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import ml_collections

from wamjax import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str) -> ml_collections.ConfigDict:
    """configs/wam.py's get_config(arg), loaded as config_flags would load it."""
    return config_files.get_config(f"{os.path.join(REPO, 'configs', 'wam.py')}:{arg}")


def main_command(workdir: str, arg: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "wamjax.main", f"--config={os.path.join(REPO, 'configs', 'wam.py')}:{arg}",
            f"--workdir={workdir}", *overrides]


def subprocess_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    return env


def run_main(workdir: str, arg: str, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(workdir, arg, *overrides), env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def metrics_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


OPENPI_CLIENT_VERSION = "0.1.2"  # pins numpy<2, hence its own venv
# openpi-client 0.1.2 imports typing_extensions without declaring it as a dependency.
OPENPI_CLIENT_EXTRAS = ("typing_extensions",)
OPENPI_VENV = os.path.join(REPO, ".venv-openpi-client")  # git-ignored (.venv-*/), reused across runs


def openpi_client_python() -> str:
    """The Python of a venv with the pinned openpi-client (created on first use, then reused; a file lock keeps
    two test workers from building it at once)."""
    python = os.path.join(OPENPI_VENV, "bin", "python")
    probe = [python, "-c", f"import openpi_client.websocket_client_policy, importlib.metadata as m; "
                           f"assert m.version('openpi-client') == {OPENPI_CLIENT_VERSION!r}"]
    with open(OPENPI_VENV + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", OPENPI_VENV], check=True, timeout=300)
        result = subprocess.run([python, "-m", "pip", "install", "-q", f"openpi-client=={OPENPI_CLIENT_VERSION}",
                                 *OPENPI_CLIENT_EXTRAS], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"pip install openpi-client=={OPENPI_CLIENT_VERSION} failed:\n{result.stderr}"
        return python
