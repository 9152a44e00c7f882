"""The report of a video ingest (counts, per-shard clips, every skipped file and why) and its progress bar."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from absl import logging

from wamjax.jobs.ingest_decode import ClipOptions
from wamjax.jobs.ingest_shards import summary_name

REPORT_NAME = "ingest_report.json"


class Progress:
    """A one-line progress bar (carriage return on a terminal, periodic log lines otherwise)."""

    def __init__(self, total_files: int, enabled: bool):
        self.total_files = total_files
        self.enabled = enabled
        self.counts = {"files": 0, "clips": 0, "frames": 0}
        self.start = time.monotonic()
        self.last_print = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, delta: dict[str, int]) -> None:
        for key, value in delta.items():
            self.counts[key] += value
        self.show(final=False)

    def show(self, final: bool) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last_print < (0.2 if self.tty else 10.0):
            return
        self.last_print = now
        elapsed = max(now - self.start, 1e-9)
        done = self.counts["files"]
        width = 30
        filled = int(width * done / max(self.total_files, 1))
        line = (
            f"ingest [{'#' * filled}{'.' * (width - filled)}] files {done}/{self.total_files} "
            f"clips {self.counts['clips']} frames {self.counts['frames']} "
            f"({self.counts['frames'] / elapsed:.0f} frames/s)"
        )
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            logging.info(line)


def make_report(
    out_dir: str, num_shards: int, no_caption: list[dict[str, str]], options: ClipOptions
) -> dict[str, Any]:
    """The ingest report, from the summaries of all `num_shards` shards and the files without a caption."""
    summaries = []
    for i in range(num_shards):
        with open(os.path.join(out_dir, summary_name(i, num_shards)), encoding="utf-8") as f:
            summaries.append(json.load(f))
    skipped = sorted(no_caption + [entry for s in summaries for entry in s["skipped"]], key=lambda entry: entry["path"])
    return {
        "videos_found": sum(s["files"] for s in summaries) + len(no_caption),
        "videos_used": sum(s["videos_used"] for s in summaries),
        "videos_skipped": len(skipped),
        "clips": sum(s["clips"] for s in summaries),
        "frames": sum(s["frames"] for s in summaries),
        "num_shards": num_shards,
        "shards": {s["shard"]: s["clips"] for s in summaries},
        "skipped": skipped,
        "options": asdict(options) | {"resolution": list(options.resolution)},
    }
