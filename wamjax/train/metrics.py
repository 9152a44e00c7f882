"""Metrics sinks: metrics.jsonl and TensorBoard on process 0, and the progress line of the absl log."""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any


class MetricsWriter:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
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
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after `step` (a resume from that step re-logs them), keeping the file consistent."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

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
    return (
        f"[{row['stage']}] step {row['step']} ({stage_steps}/{total_steps}) | {losses} | "
        f"lr {row['learning_rate']:.2e} | {row['step_time_s']:.3f} s/step, {_eng(row['examples_per_s'])} ex/s, "
        f"{_eng(row['tokens_per_s'])} tok/s{mfu} | stage FLOPs {_eng(row['stage_flops'])}{budget} | "
        f"ETA {datetime.timedelta(seconds=int(eta))}"
    )
