"""Goodput from logs: where a run's wall time went, by cause and start, and the steps a restart computed again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import REPO, get_config, main_command, subprocess_env

from wamjax.checkpoint import manager as ckpt
from wamjax.flops import goodput as goodput_lib
from wamjax.flops.stage import train_step_flops
from wamjax.stages import stage_spec

ARG = "size=tiny,stage=video_pretrain"
STEPS, EVERY = 8, 3


def _segment(attempt, stage, start_step, at_step, started_at, step_s=10.0, compile_s=5.0, process=0):
    steps = at_step - start_step
    seconds = dict.fromkeys(goodput_lib.CAUSES, 1.0)
    seconds.update(step=step_s, compile=compile_s)
    return {"event": "goodput", "attempt": attempt, "process": process, "processes": 1, "stage": stage,
            "start_step": start_step, "at_step": at_step, "steps": steps, "resumed": start_step > 0,
            "step_flops": 2.0, "started_at": started_at, "time": started_at + sum(seconds.values()),
            "wall_s": sum(seconds.values()), "seconds": seconds}


def test_lost_progress_is_what_a_start_computed_past_the_next_start_s_restore():
    # Start a reaches step 10 of video (checkpoint at 6); start b restores 6, reaches 8 and dies; start c
    # restores 6 again and finishes at 12, then runs action_tune.
    segments = [_segment("a", "video", 0, 10, 0.0), _segment("b", "video", 6, 8, 100.0),
                _segment("c", "video", 6, 12, 200.0), _segment("c", "action", 12, 20, 300.0)]
    per_stage = goodput_lib.goodput_by_stage(segments)
    video, action = per_stage["video"], per_stage["action"]
    assert video["redone_steps"] == (10 - 6) + (8 - 6) and action["redone_steps"] == 0
    assert video["redone_flops"] == 6 * 2.0
    # Start a's 10 steps took 10 s: 4 of them were lost; b's 2 steps took 10 s, all lost.
    assert video["badput_seconds"]["lost_progress"] == pytest.approx(4.0 + 10.0)
    assert video["productive_seconds"] == pytest.approx(30.0 - 14.0)
    assert video["compile_seconds"] == [5.0, 5.0, 5.0]
    for g in per_stage.values():
        assert g["productive_seconds"] + sum(g["badput_seconds"].values()) == pytest.approx(g["wall_seconds"])
    run = goodput_lib.run_goodput(per_stage)
    assert run["goodput"] == pytest.approx((16.0 + 10.0) / (4 * 21.0))  # a segment: 6 x 1 s, 10 s steps, 5 s compile


def test_recorder_moves_jax_compiles_to_compile_and_covers_the_wall_time(tmp_path):
    started = time.time()
    with goodput_lib.GoodputRecorder(tmp_path, started=started - 0.2) as recorder:
        recorder.begin_stage("video", 0, 1.0)
        recorder.switch("step")
        # A fresh function (its shape unseen) compiles here; the recorder hears JAX's compile spans.
        n = int(started * 1000) % 97 + 3
        jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + n)(jnp.ones((n, n))).block_until_ready()
        recorder.step_done(1)
        recorder.switch("data")
        time.sleep(0.05)
    (segment,) = goodput_lib.read_goodput(tmp_path)
    seconds = segment["seconds"]
    assert seconds["compile"] > 0 and seconds["trace"] > 0 and seconds["data"] >= 0.05 and seconds["init"] >= 0.2
    assert sum(seconds.values()) == pytest.approx(segment["wall_s"], rel=0.02)
    assert segment["wall_s"] == pytest.approx(time.time() - started + 0.2, abs=0.1)
    with pytest.raises(ValueError, match="goodput cause 'nap'"):
        recorder.switch("nap")


def _goodput_lines(workdir):
    path = os.path.join(workdir, goodput_lib.GOODPUT_DIR, "process_0.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def test_killed_and_resumed_run_reports_redone_steps_and_compiles_of_each_start(tmp_path):
    """Also the persistent compilation cache: the run's own (empty at first), so the first start compiles
    everything and the second loads it."""
    workdir = str(tmp_path / "run")
    overrides = [f"--config.train.steps={STEPS}", "--config.train.log_every=1",
                 f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.async_save=False"]
    command = main_command(workdir, ARG, *overrides)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}  # the default: WORKDIR/compilation_cache, JAX's thresholds

    # 1) SIGKILL once step EVERY + 2 is recorded: the checkpoint at EVERY is the newest complete one.
    began = time.time()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while not any(line["at_step"] >= EVERY + 2 for line in _goodput_lines(workdir)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "step not reached"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first_wall = time.time() - began
    killed_at = _goodput_lines(workdir)[-1]["at_step"]
    restored = ckpt.make_manager(workdir, get_config(ARG).checkpoint).latest_step()
    assert restored == EVERY and killed_at > restored

    # 2) The same command resumes from the checkpoint and finishes.
    began = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    second_wall = time.time() - began

    # 3) From the logs alone.
    out = subprocess.run([sys.executable, "-m", "wamjax.flops.report", f"--workdir={workdir}", "--format=json"],
                         cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    (stage,), (run,) = report["stages"], report["runs"]
    step_flops = train_step_flops(stage_spec(get_config(ARG), "video_pretrain")).train_per_step
    assert stage["steps"] == STEPS and stage["flops"] == pytest.approx(STEPS * step_flops, rel=1e-9)
    assert stage["redone_steps"] == killed_at - restored == run["redone_steps"]
    assert stage["redone_flops"] == pytest.approx((killed_at - restored) * step_flops, rel=1e-9)
    assert stage["spent_flops"] == pytest.approx(stage["flops"] + stage["redone_flops"], rel=1e-12)
    assert len(stage["compile_seconds"]) == 2 and all(c > 0 for c in stage["compile_seconds"])
    assert run["compile_seconds"] == stage["compile_seconds"]
    cold, warm = stage["compile_seconds"]
    assert warm < 0.1 * cold, stage["compile_seconds"]  # XLA compiles came from WORKDIR/compilation_cache
    assert os.listdir(os.path.join(workdir, "compilation_cache"))
    assert all(t > 0 for t in stage["trace_seconds"])  # tracing and lowering: every start
    assert stage["badput_seconds"]["restore"] > 0 and stage["badput_seconds"]["lost_progress"] > 0
    total = run["productive_seconds"] + sum(run["badput_seconds"].values())
    assert total == pytest.approx(run["wall_seconds"], rel=0.02)
    assert 0 < run["goodput"] < 1
    # The wall time is the two starts' lives as seen from outside, less interpreter start-up and exit.
    assert 0.8 * (first_wall + second_wall) < run["wall_seconds"] < first_wall + second_wall
    (process,) = run["processes"]
    assert process["process"] == 0 and np.isclose(process["wall_seconds"], run["wall_seconds"])

    table = subprocess.run([sys.executable, "-m", "wamjax.flops.report", f"--workdir={workdir}"], cwd=REPO,
                           env=subprocess_env(1), capture_output=True, text=True, check=True).stdout
    assert "goodput" in table and "lost_progress" in table
