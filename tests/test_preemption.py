"""Real 2-process jobs on localhost: a SIGTERM that reaches one process saves the same step on both, which exit 75
and resume bitwise; parameters-only restores onto a mesh spanning both processes (`init_from` into action_tune,
and a `stage=all` job restarted between its stages)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_utils import REPO, metrics_rows, subprocess_env

from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import load_checkpoint
from wamjax.train.preemption import PREEMPTED_EXIT_CODE

VIDEO_STEPS, ACTION_STEPS = 1, 6
FINAL_STEP = VIDEO_STEPS + ACTION_STEPS
TIMEOUT_S = 1500  # a shared 2-core machine compiles 4 processes at once
FLAGS = [
    f"--config.stages.video_pretrain.steps={VIDEO_STEPS}", f"--config.stages.action_tune.steps={ACTION_STEPS}",
    "--config.train.log_every=1", "--config.checkpoint.every_steps=100",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_leftover_processes():
    """A failed assertion must not leave trainer processes running (they would wait on their peer forever)."""
    yield
    for proc in _RUNNING:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _RUNNING.clear()


class _Job:
    """Two `python -m wamjax.main` processes (4 simulated CPU devices each) joined by jax.distributed."""

    def __init__(self, workdir, stage: str, logs, name: str, *overrides: str):
        port = _free_port()
        # JAX's persistent cache keeps process 0's executables only, so with a warm cache process 1 alone
        # compiles and can reach the first collective past gloo's 30 s rendezvous: both compile instead.
        env = {k: v for k, v in subprocess_env(4).items() if k != "JAX_COMPILATION_CACHE_DIR"}
        self.logs = [logs / f"{name}_p{i}.log" for i in range(2)]
        self.procs = []
        for i, log in enumerate(self.logs):
            command = [
                sys.executable, "-m", "wamjax.main", f"--config={REPO}/configs/wam.py:size=tiny,stage={stage}",
                f"--workdir={workdir}", *FLAGS, *overrides, "--config.distributed.initialize=true",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
            ]
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT))
        _RUNNING.extend(self.procs)

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self) -> list[int]:
        """Both exit codes; a process left waiting on a failed peer is stopped after a minute."""
        deadline = time.time() + TIMEOUT_S
        failed_at = None
        while any(p.poll() is None for p in self.procs):
            codes = [p.poll() for p in self.procs]
            if failed_at is None and any(c not in (None, 0, PREEMPTED_EXIT_CODE) for c in codes):
                failed_at = time.time()
            if time.time() > deadline or (failed_at is not None and time.time() > failed_at + 60):
                for p in self.procs:
                    p.kill()
                    p.wait()
                break
            time.sleep(0.5)
        return [proc.returncode for proc in self.procs]

    def expect(self, code: int) -> None:
        codes = self.wait()
        tails = f"p0:\n{self.output(0)[-3000:]}\np1:\n{self.output(1)[-3000:]}"
        assert codes == [code, code], f"exit codes {codes}; {tails}"


def _wait_for_step(job: _Job, workdir, step: int) -> None:
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
        codes = [p.poll() for p in job.procs]
        assert codes == [None, None], f"exited early {codes}:\n{job.output(0)[-3000:]}\n{job.output(1)[-3000:]}"
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line).get("step", 0) for line in f if line.strip().endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.1)
    pytest.fail(f"step {step} not reached")


def _saved_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(ckpt.checkpoint_dir(workdir)) if d.isdigit())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_host_sigterm_saves_everywhere_and_restores_are_params_only(tmp_path):
    straight, preempted = str(tmp_path / "straight"), str(tmp_path / "preempted")

    # Video pretraining alone; both `stage=all` jobs below start from its checkpoint.
    _Job(straight, "video_pretrain", tmp_path, "video").expect(0)
    shutil.copytree(straight, preempted)
    video_ckpt = os.path.join(ckpt.checkpoint_dir(straight), str(VIDEO_STEPS))

    # The reference tunes actions from `init_from` (the video checkpoint); the other job restarts between its
    # stages and takes the same parameters from its previous stage's checkpoint: both start identically.
    reference = _Job(straight, "all", tmp_path, "reference", f"--config.stages.action_tune.init_from={video_ckpt}")
    job = _Job(preempted, "all", tmp_path, "preempted")

    # SIGTERM to process 1 only, once action tuning has taken a step: both save one agreed step and exit 75.
    _wait_for_step(job, preempted, VIDEO_STEPS + 1)
    job.procs[1].send_signal(signal.SIGTERM)
    job.expect(PREEMPTED_EXIT_CODE)
    saved_at = [re.findall(r"preemption checkpoint at step (\d+) written", job.output(i)) for i in range(2)]
    assert len(saved_at[0]) == 1 and saved_at[0] == saved_at[1], saved_at
    step = int(saved_at[0][0])
    assert VIDEO_STEPS < step <= FINAL_STEP
    assert _saved_steps(preempted) == [VIDEO_STEPS, step]
    data_dir = os.path.join(ckpt.checkpoint_dir(preempted), str(step), "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert max(r["step"] for r in metrics_rows(preempted)) == step

    # The same command resumes and ends bitwise equal to the uninterrupted job.
    resumed = _Job(preempted, "all", tmp_path, "resumed")
    reference.expect(0)
    resumed.expect(0)
    for i in range(2):  # parameters-only restores onto the mesh spanning both processes
        assert "parameters from checkpoint" in reference.output(i)
        assert "parameters from the previous stage video_pretrain (checkpoint" in job.output(i)
        for out in (reference.output(i), job.output(i)):
            assert re.search(r"init_from: \d+ tensors restored, \d+ freshly initialized \(\['actions'\]\)", out)
    a, b = metrics_rows(straight), metrics_rows(preempted)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, FINAL_STEP + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in ("stage", "loss", "loss_video", "loss_action", "stage_flops", "stage_samples"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)  # bitwise on CPU
    _, params_a = load_checkpoint(os.path.join(ckpt.checkpoint_dir(straight), str(FINAL_STEP)), use_ema=False)
    _, params_b = load_checkpoint(os.path.join(ckpt.checkpoint_dir(preempted), str(FINAL_STEP)), use_ema=False)
    assert set(params_a) == set(params_b) and "actions" in params_a
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_launcher_waits_for_the_others_when_one_is_preempted(tmp_path):
    # Stand-in interpreter: process 1 exits 75 at once; process 0 exits 75 a little later (its agreed save).
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in *process_id=1*) exit 75;; esac\n'
        f"sleep 2; touch {tmp_path}/p0_finished; exit 75\n"
    )
    fake_python.chmod(0o755)
    result = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "--config=unused", "--workdir=unused"],
        cwd=REPO, env={**subprocess_env(8), "PYTHON": str(fake_python), "COORDINATOR_PORT": "1"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr
    assert (tmp_path / "p0_finished").exists()  # process 0 was left to finish, not stopped
    assert "stopping the others" not in result.stderr
