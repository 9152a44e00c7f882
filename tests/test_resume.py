"""Preemption and exact resume: SIGTERM saves and exits 75, SIGKILL loses nothing, both stages, on a mixture of
OXE datasets and a LeRobot dataset (and captioned-video shards in the video stage)."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from train_utils import REPO, get_config, main_command, metrics_rows, subprocess_env

from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import load_checkpoint
from wamjax.flops.stage import train_step_flops
from wamjax.stages import stage_spec
from wamjax.train.preemption import PREEMPTED_EXIT_CODE

DATASETS = "bridge,taco_play,lerobot:lerobot_sim"
STEPS = 8


@pytest.fixture(scope="module")
def oxe_dir(tmp_path_factory):
    from data_pipelines.make_oxe_like import make_datasets
    from data_pipelines.standardize.stats import compute_stats, save_stats

    root = str(tmp_path_factory.mktemp("oxe"))
    from data_pipelines.make_lerobot import synthetic_episodes, write_dataset
    from data_pipelines.make_videos import make_videos
    from wamjax.jobs.ingest_video import ingest

    make_datasets(root, ["bridge", "taco_play"], episodes=6, seed=3, image_size=(48, 64))
    write_dataset(os.path.join(root, "lerobot_sim"), synthetic_episodes(6, seed=3), episodes_per_file=4)
    save_stats(compute_stats(root, DATASETS.split(",")), os.path.join(root, "stats.json"))
    captions = make_videos(os.path.join(root, "videos"), num_videos=4, num_frames=24)
    videos = [os.path.join(root, "videos", "*.mp4"), os.path.join(root, "videos", "*.mkv")]
    report = ingest(videos, captions, os.path.join(root, "video_shards"), num_frames=9,
                    fps=8, resolution=(32, 32), resize_mode="crop", num_shards=2, workers=1, show_progress=False)
    assert not report.get("skipped"), report
    return root


def _video_budget() -> float:
    config = get_config("size=tiny,stage=video_pretrain")
    return 6.5 * train_step_flops(stage_spec(config, "video_pretrain")).train_per_step  # buys 6 of the 8 steps


def _overrides(oxe_dir):
    return [
        "--config.data.source=oxe", f"--config.data.data_dir={oxe_dir}",
        f"--config.data.stats_path={oxe_dir}/stats.json", f"--config.data.datasets={DATASETS}",
        "--config.data.weights=(3.0,1.0,1.0)", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
        "--config.checkpoint.every_steps=3", "--config.checkpoint.async_save=True",
        f"--config.stages.video_pretrain.budget_flops={_video_budget()}",
        f"--config.data.video_shards={oxe_dir}/video_shards", "--config.data.video_weight=1.0",
    ]


def _start(workdir, oxe_dir):
    return subprocess.Popen(main_command(workdir, "size=tiny,stage=all", *_overrides(oxe_dir)), cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=400):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line).get("step", 0) for line in f if line.strip().endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def _report(workdir):
    out = subprocess.run([os.sys.executable, "-m", "wamjax.flops.report", f"--workdir={workdir}", "--format=json"],
                         cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    rows = rows["stages"] if isinstance(rows, dict) else rows
    return {r["stage"]: (r["steps"], r["samples"], r["flops"]) for r in rows}


def test_preempted_and_killed_run_matches_uninterrupted(tmp_path, oxe_dir):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    proc = _start(straight, oxe_dir)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    # 1) SIGTERM in video pretraining: finishes the step, saves, exits 75.
    proc = _start(interrupted, oxe_dir)
    _wait_for_step(proc, interrupted, 4)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE
    preempted_at = max(r["step"] for r in metrics_rows(interrupted))
    assert os.path.isdir(os.path.join(ckpt.checkpoint_dir(interrupted), str(preempted_at)))

    # 2) Resume with the same command, then SIGKILL during action tuning (after its first checkpoint).
    proc = _start(interrupted, oxe_dir)
    _wait_for_step(proc, interrupted, 11)
    proc.kill()
    proc.wait()
    # A save cut short leaves only a temporary directory, which is never taken as the latest step.
    complete = ckpt.make_manager(interrupted, get_config("size=tiny").checkpoint).latest_step()
    fake = os.path.join(ckpt.checkpoint_dir(interrupted), f"{complete + 50}.orbax-checkpoint-tmp-0")
    shutil.copytree(os.path.join(ckpt.checkpoint_dir(interrupted), str(complete)), fake)
    assert ckpt.make_manager(interrupted, get_config("size=tiny").checkpoint).latest_step() == complete

    # 3) Resume to the end.
    proc = _start(interrupted, oxe_dir)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    a, b = metrics_rows(straight), metrics_rows(interrupted)
    steps_b = [r["step"] for r in b]
    assert steps_b == sorted(set(steps_b)), "metrics.jsonl has duplicated or unordered steps after resume"
    assert [r["step"] for r in a] == steps_b
    assert [r["stage"] for r in a] == [r["stage"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss_video", "loss_action", "stage_flops", "stage_samples"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)  # bitwise on CPU
    video_steps = [r["step"] for r in a if r["stage"] == "video_pretrain"]
    assert video_steps[-1] == 6  # stopped by its FLOP budget, not its 8 steps

    final = max(steps_b)
    _, params_a = load_checkpoint(os.path.join(ckpt.checkpoint_dir(straight), str(final)), use_ema=False)
    _, params_b = load_checkpoint(os.path.join(ckpt.checkpoint_dir(interrupted), str(final)), use_ema=False)
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(x, y)

    # The FLOP ledger survived both restarts, and the report from logs alone counts nothing twice.
    report_a, report_b = _report(straight), _report(interrupted)
    assert report_a == report_b
    assert report_a["video_pretrain"][0] == 6 and report_a["action_tune"][0] == STEPS
