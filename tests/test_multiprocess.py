"""A real 2-process x 4-device run on localhost trains like the single-process 8-device run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from wamjax.checkpoint.load import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5
TIMEOUT_S = 600

# Distinct clips: each process reads a contiguous block of every global batch, so the 2-process run sees
# the same global batches (and pairs them with the same noise) as the 1-process run.
TRAIN_FLAGS = [
    "--config=configs/wam.py:size=tiny,stage=video_pretrain",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    f"--config.checkpoint.every_steps={STEPS}",
]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(workdir: str) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def _finish(proc: subprocess.Popen, name: str) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{name} did not finish in {TIMEOUT_S}s; output tail:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{name} exited {proc.returncode}; output tail:\n{out[-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    # Both runs at once: each spends most of its time compiling on one core.
    single = subprocess.Popen(
        [sys.executable, "-m", "wamjax.main", *TRAIN_FLAGS, f"--workdir={single_dir}",
         "--config.distributed.initialize=false"],
        cwd=REPO, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    multi = subprocess.Popen(
        ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", *TRAIN_FLAGS, f"--workdir={multi_dir}"],
        # JAX's persistent cache keeps process 0's executables only, so with a warm cache process 1 alone
        # compiles and, on a busy machine, can reach the first collective past gloo's 30 s rendezvous.
        cwd=REPO, env={**{k: v for k, v in _env(8).items() if k != "JAX_COMPILATION_CACHE_DIR"},
                       "DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    multi_out = _finish(multi, "launch/local_multiprocess.sh 2")
    _finish(single, "single-process run")

    # Both processes really joined one 8-device job, and only process 0 wrote metrics.
    assert "[p0]" in multi_out and "[p1]" in multi_out
    assert "jax.distributed: process 1 of 2" in multi_out
    assert "over 8 devices (2 processes)" in multi_out
    single_losses, multi_losses = _losses(single_dir), _losses(multi_dir)
    assert [s for s, _ in multi_losses] == list(range(1, STEPS + 1)), multi_losses
    assert [s for s, _ in single_losses] == [s for s, _ in multi_losses]
    np.testing.assert_allclose([v for _, v in multi_losses], [v for _, v in single_losses], rtol=1e-5)
    # Every process saved its own data-iterator state.
    data_dir = os.path.join(multi_dir, "checkpoints", str(STEPS), "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"
    ]

    _, single_params = load_checkpoint(os.path.join(single_dir, "checkpoints"))
    _, multi_params = load_checkpoint(os.path.join(multi_dir, "checkpoints"))
    assert jax.tree.structure(single_params) == jax.tree.structure(multi_params)
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)),
        multi_params, single_params,
    )


def test_launcher_stops_the_others_and_fails_when_one_process_fails(tmp_path):
    # A stand-in interpreter: process 1 fails at once, process 0 would block forever (as in a collective).
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in *process_id=1*) echo "boom"; exit 3;; esac\n'
        f'echo $$ > {tmp_path}/sleeper.pid\n'
        "exec sleep 300\n"
    )
    fake_python.chmod(0o755)
    start = time.monotonic()
    result = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "--config=unused", "--workdir=unused"],
        cwd=REPO, env={**_env(8), "PYTHON": str(fake_python), "COORDINATOR_PORT": "1"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 30  # the blocked process was stopped, not waited for
    assert "[p1] boom" in result.stdout
    assert "process 1" in result.stderr and "exited with status 3" in result.stderr
    if (tmp_path / "sleeper.pid").exists():  # absent when process 0 was stopped before it got that far
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / "sleeper.pid").read_text()), 0)
