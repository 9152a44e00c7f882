"""Workdirs, checkpoints, metrics and exports go through etils.epath: a cloud URI is never made a local path."""

from __future__ import annotations

import os

import pytest

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
