"""Workdirs, checkpoints, metrics and exports go through etils.epath: a cloud URI is never made a local path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from train_utils import REPO, subprocess_env

from wamjax.checkpoint import manager as ckpt
from wamjax.paths import as_path, is_uri

BUCKET_RUN = "gs://wamjax-test-bucket/runs/a"


def test_uri_workdir_paths_stay_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(ckpt.checkpoint_dir(BUCKET_RUN)) == f"{BUCKET_RUN}/checkpoints"
    assert str(ckpt.step_dir(BUCKET_RUN, 12)) == f"{BUCKET_RUN}/checkpoints/12"
    assert str(as_path("s3://bucket/x") / "metrics.jsonl") == "s3://bucket/x/metrics.jsonl"
    assert is_uri(ckpt.checkpoint_dir(BUCKET_RUN))
    # Local paths are made absolute once, so a later chdir cannot move them.
    assert str(ckpt.checkpoint_dir("runs/b")) == os.path.join(str(tmp_path), "runs", "b", "checkpoints")
    assert not os.listdir(tmp_path)  # computing paths wrote nothing


def test_unknown_scheme_is_refused_naming_the_path():
    with pytest.raises(ValueError, match=r"file:///tmp/run: unsupported path scheme"):
        as_path("file:///tmp/run")


def test_gs_workdir_goes_to_the_cloud_backend_not_to_local_disk(tmp_path):
    """The trainer's first write to a gs:// workdir reaches epath's GCS backend (fsspec here, which has no
    GCS client installed, so it stops there) instead of creating `<cwd>/gs:/...` on local disk."""
    env = {**subprocess_env(1), "EPATH_USE_TF": "false"}  # epath's fsspec backend: fails fast without gcsfs
    result = subprocess.run(
        [sys.executable, "-m", "wamjax.main", f"--config={os.path.join(REPO, 'configs', 'wam.py')}:size=tiny",
         f"--workdir={BUCKET_RUN}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "install gcsfs to access Google Storage" in result.stderr, result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "gs:") and not os.listdir(tmp_path)
