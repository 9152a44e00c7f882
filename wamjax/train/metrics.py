"""Metrics: the row of a log step, its sinks (metrics.jsonl and TensorBoard on process 0), and the progress line
of the absl log."""

from __future__ import annotations

import datetime
import io
import json
import math
import secrets
import struct
from typing import TYPE_CHECKING, Any

from wamjax.paths import LineLog, PathLike, as_path, is_uri, read_log_lines

if TYPE_CHECKING:
    from wamjax.flops.ledger import FlopLedger
    from wamjax.flops.stage import StepFlops

ROLL_EVENT_BYTES = 1 << 20  # a TensorBoard event file on an object store is rolled at this size


class _EpathRecordWriter:
    """A TensorBoard event file at a URI, rolled: each flush rewrites only the newest part (`<file>`, then
    `<file>.000001`, ...; TensorBoard reads every file with `tfevents` in its name, in name order), and a part
    that has reached `roll_bytes` is written once more and left as it is, so a flush costs at most that much
    (plus one event) whatever the run's length.

    Parts are cut between records only, when a record begins (tensorboardX writes one as length, its CRC, the
    data and its CRC), so the cut does not depend on when the writer's thread has caught up with a flush."""

    def __init__(self, path: str, roll_bytes: int = ROLL_EVENT_BYTES):
        self.path = as_path(path)
        self.roll_bytes = int(roll_bytes)
        self.part = 0
        self.buffer = io.BytesIO()
        self._record_left = 0  # bytes of the record being written still to come

    def write(self, data: bytes) -> None:
        if self._record_left == 0:  # a record's 8-byte length: the record is 8 + 4 + length + 4 bytes
            if self.buffer.tell() >= self.roll_bytes:
                self._write_part()
                self.part, self.buffer = self.part + 1, io.BytesIO()
            self._record_left = 8 + 4 + struct.unpack("Q", data[:8])[0] + 4
        self.buffer.write(data)
        self._record_left -= len(data)

    def _write_part(self) -> None:
        name = self.path if self.part == 0 else self.path.parent / f"{self.path.name}.{self.part:06d}"
        name.write_bytes(self.buffer.getvalue())

    def flush(self) -> None:
        self._write_part()

    def close(self) -> None:
        self.flush()


class _EpathRecordWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path, ROLL_EVENT_BYTES)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_writer(logdir: str) -> Any:
    from tensorboardX import SummaryWriter, record_writer

    if is_uri(logdir):
        # tensorboardX's own gs:// and s3:// writers need google-cloud-storage or boto3 and know no other
        # scheme; epath already reaches every store the checkpoints go to.
        record_writer.register_writer_factory(logdir.split(":", 1)[0], _EpathRecordWriterFactory())
        # An event file is named by the second it was opened in; on an object store a second writer of that
        # second (a resume, a restart) would replace the first one's file instead of appending to it.
        return SummaryWriter(logdir, filename_suffix=f".{secrets.token_hex(4)}")
    return SummaryWriter(logdir)


class MetricsWriter:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and scalars to TensorBoard.

    The workdir may be local or any etils.epath URI. Object stores cannot append, so there both logs are
    rolled (`wamjax.paths.LineLog`, `_EpathRecordWriter`): a write costs the same at step 10 and step 10^6.
    """

    def __init__(self, workdir: PathLike, enabled: bool = True, roll_lines: int | None = None):
        self.enabled = enabled
        self.path = as_path(workdir) / "metrics.jsonl"
        self._log = LineLog(self.path, *(() if roll_lines is None else (roll_lines,)))
        self._tb = None
        if enabled:
            self._tb = _tensorboard_writer(str(as_path(workdir) / "tensorboard"))

    def _write_line(self, line: str) -> None:
        self._log.write(line)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write_line(json.dumps(row, allow_nan=True) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                self._tb.add_scalar(f"{row['stage']}/{key}", value, row["step"])
        self._tb.flush()

    def write_eval(self, row: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """An offline-eval row (an event line: the FLOP report skips it), its scalars under `eval/` and
        uint8 [H, W, 3] images in TensorBoard."""
        if not self.enabled:
            return
        self.write_event(row)
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self._tb.add_scalar(f"eval/{key}", value, row["step"])
        for name, image in (images or {}).items():
            self._tb.add_image(f"eval/{name}", image, row["step"], dataformats="HWC")
        self._tb.flush()

    def write_event(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write_line(json.dumps(event) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after `step` (a resume from that step re-logs them), keeping the file consistent."""
        if not self.enabled:
            return
        lines = read_log_lines(self.path)
        if not lines:
            return
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            self._log.rewrite(kept)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _eng(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def format_progress(row: dict[str, Any], total_steps: int, stage_steps: int) -> str:
    """One human line per logged step: where, loss, speed, ETA and FLOPs so far."""
    eta = (total_steps - stage_steps) * row["step_time_s"]
    losses = f"loss {row['loss']:.4f} (video {row['loss_video']:.4f}"
    losses += f", action {row['loss_action']:.4f})" if "loss_action" in row else ")"
    budget = f" ({100 * row['budget_fraction']:.1f}% of budget)" if row.get("budget_fraction") is not None else ""
    mfu = f" | MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
    if row.get("hardware_utilization") is not None:
        mfu += f" (hardware {100 * row['hardware_utilization']:.1f}%)"
    return (
        f"[{row['stage']}] step {row['step']} ({stage_steps}/{total_steps}) | {losses} | "
        f"lr {row['learning_rate']:.2e} | {row['step_time_s']:.3f} s/step, {_eng(row['examples_per_s'])} ex/s, "
        f"{_eng(row['tokens_per_s'])} tok/s{mfu} | stage FLOPs {_eng(row['stage_flops'])}{budget} | "
        f"ETA {datetime.timedelta(seconds=int(eta))}"
    )


def metrics_row(stage: str, step: int, metrics: dict[str, Any], step_time: float, flops: StepFlops, ledger: FlopLedger,
                budget: float, peak: float | None, num_devices: int, batch: int, tokens: int) -> dict[str, Any]:
    """The metrics.jsonl row of a log step: losses, step time and throughput, the step's and the stage's FLOPs,
    the budget spent and MFU against `peak` FLOP/s per device."""
    row: dict[str, Any] = {"step": step, "stage": stage}
    for key in ("loss", "loss_video", "loss_action", "actions_share", "learning_rate", "grad_norm"):
        if key in metrics:
            row[key] = float(metrics[key])
    row["update_skipped"] = int(metrics["update_skipped"])  # non-finite, or a loss spike
    if "stage_spike_skips" in metrics:  # optim.skip_step_on_spike
        row["spike_skipped"] = int(metrics["spike_skipped"])
        row["stage_spike_skips"] = int(metrics["stage_spike_skips"])
    row["step_time_s"] = step_time
    row["examples_per_s"] = batch / step_time
    row["tokens_per_s"] = tokens / step_time
    row["step_flops"] = flops.train_per_step  # model FLOPs: what budgets and MFU count
    row["hardware_step_flops"] = flops.hardware_per_step  # what the kernels compute, remat included
    row["frozen_flops_per_step"] = flops.frozen_per_step
    row["stage_flops"] = ledger.stage_flops(stage)
    row["stage_hardware_flops"] = ledger.stage_hardware_flops(stage)
    row["stage_frozen_flops"] = ledger.stage_frozen_flops(stage)
    row["stage_steps"] = ledger.stage_steps(stage)
    row["stage_samples"] = ledger.stage_samples(stage)
    row["stage_tokens"] = ledger.stage_tokens(stage)
    row["wall_time_s"] = ledger.stage_seconds(stage)
    row["budget_flops"] = budget
    row["budget_fraction"] = ledger.stage_flops(stage) / budget if budget else None
    row["flops_per_s"] = flops.train_per_step / step_time
    row["mfu"] = row["flops_per_s"] / (peak * num_devices) if peak else None
    row["hardware_flops_per_s"] = flops.hardware_per_step / step_time
    row["hardware_utilization"] = row["hardware_flops_per_s"] / (peak * num_devices) if peak else None
    rate = ledger.stage_flops(stage) / max(ledger.stage_seconds(stage), 1e-9)
    row["eta_budget_s"] = max(budget - ledger.stage_flops(stage), 0.0) / rate if budget else None
    return row
