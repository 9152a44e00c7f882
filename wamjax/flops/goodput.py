"""Goodput: where each process's wall time went, per stage and start, and the progress a restart threw away.

The trainer keeps one `GoodputRecorder` per process. Every moment from the process's start belongs to exactly
one cause (CAUSES): the loop switches the cause as it goes (data -> step -> eval -> checkpoint ...), and the
time JAX spends lowering and compiling (its own monitoring spans, whatever cause was current) moves to
`compile`. The recorder appends cumulative lines (`event: goodput`) to WORKDIR/goodput/process_<i>.jsonl at
each logged step, checkpoint and stage end; a killed process loses only what it did after its last line.

From those lines alone (`read_goodput`, `goodput_by_stage`) the report derives, per stage: wall time, seconds
by cause, and lost progress: steps a start computed past the checkpoint that the next start of the same stage
restored from (SIGKILL, or a crash) were computed again, so their FLOPs and step seconds were badput
(`lost_progress`). Goodput is productive step seconds over wall seconds. The FLOP ledger (restored with each
checkpoint) never held the redone steps, so budgets are spent on productive FLOPs only.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jax

from wamjax.paths import LineLog, PathLike, as_path, log_parts, read_log_lines

GOODPUT_DIR = "goodput"
# Every second of a process's life is one of these; `lost_progress` is moved out of `step` by the report.
CAUSES = ("init", "restore", "trace", "compile", "data", "step", "eval", "checkpoint")
BADPUT_CAUSES = ("init", "restore", "trace", "compile", "data", "eval", "checkpoint", "lost_progress")
# JAX's spans: tracing to a jaxpr and lowering to StableHLO (`trace`: every start, no cache keeps it), and XLA's
# compilation (`compile`: what the persistent compilation cache saves; a hit is a fast load).
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_ACTIVE: list[GoodputRecorder] = []
_LISTENING = False


def _on_span(event: str, start: float, end: float, **kwargs: Any) -> None:
    if event in _TRACE_EVENTS or event == _COMPILE_EVENT:
        for recorder in _ACTIVE:
            recorder._span(event == _COMPILE_EVENT, start, end)


def _listen() -> None:
    global _LISTENING
    if not _LISTENING:
        jax.monitoring.register_event_time_span_listener(_on_span)
        _LISTENING = True


class GoodputRecorder:
    """Wall time of one process by cause, per stage segment, written as cumulative lines.

    Time inside JAX's trace and compile spans goes to `trace` and `compile` whatever the current cause.

    `started` (a `time.time()`) is when the process began; the time before the first stage counts as that
    stage's `init`. Use as a context manager (or call `close`) so the last line covers the whole run.
    """

    def __init__(self, workdir: PathLike, process: int = 0, processes: int = 1, started: float | None = None):
        self.path = as_path(workdir) / GOODPUT_DIR / f"process_{int(process)}.jsonl"
        self.process, self.processes = int(process), int(processes)
        self.attempt = uuid.uuid4().hex[:12]
        self._log = LineLog(self.path)
        self._cause = "init"
        self._since = time.time()
        self._segment_start = float(started) if started is not None else self._since
        self._spans: list[tuple[bool, float, float]] = []  # (XLA compile?, start, end)
        self._stage: str | None = None
        self._seconds = dict.fromkeys(CAUSES, 0.0)
        self._pending_init = self._since - self._segment_start  # before the recorder existed: init
        self._start_step = self._at_step = self._steps = 0
        self._step_flops = 0.0
        self._resumed = False

    # -- lifecycle --
    def __enter__(self) -> GoodputRecorder:
        _listen()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Writes the open segment's final line and stops listening for compiles."""
        if self._stage is not None:
            self.flush()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def begin_stage(self, stage: str, start_step: int, step_flops: float) -> None:
        """Closes the previous stage's segment (its last line) and opens `stage`'s at global `start_step`."""
        if self._stage is not None:
            self.flush()
            self._seconds = dict.fromkeys(CAUSES, 0.0)
            self._segment_start = self._since
        self._seconds["init"] += self._pending_init
        self._pending_init = 0.0
        self._stage, self._step_flops = stage, float(step_flops)
        self._start_step = self._at_step = int(start_step)
        self._steps = 0
        self._resumed = False

    def resumed_at(self, step: int) -> None:
        """The open stage restored its checkpoint at global `step` (steps before it are not redone)."""
        self._start_step = self._at_step = int(step)
        self._resumed = True

    # -- accounting --
    def switch(self, cause: str) -> None:
        """From now on, time goes to `cause` (compile spans excepted)."""
        if cause not in CAUSES:
            raise ValueError(f"goodput cause {cause!r}; expected one of {CAUSES}")
        self._settle()
        self._cause = cause

    def step_done(self, step: int) -> None:
        """Global step `step` of the open stage completed (dispatched)."""
        self._at_step = int(step)
        self._steps += 1

    def _span(self, is_compile: bool, start: float, end: float) -> None:
        self._spans.append((is_compile, start, end))

    def _settle(self) -> None:
        now = time.time()
        elapsed = max(now - self._since, 0.0)
        # Nested spans count once; where a trace span holds a compile, the overlap is compile.
        compile_s = min(_union_length([(s, e) for c, s, e in self._spans if c], self._since, now), elapsed)
        jax_s = min(_union_length([(s, e) for _, s, e in self._spans], self._since, now), elapsed)
        self._spans = [span for span in self._spans if span[2] > now]
        if self._stage is None:
            self._pending_init += elapsed  # before the first stage: its init (compiles included there)
        else:
            self._seconds["compile"] += compile_s
            self._seconds["trace"] += jax_s - compile_s
            self._seconds[self._cause] += elapsed - jax_s
        self._since = now

    # -- output --
    def line(self) -> dict[str, Any]:
        """The open segment's cumulative line (settles the current cause first)."""
        self._settle()
        return {
            "event": "goodput", "attempt": self.attempt, "process": self.process, "processes": self.processes,
            "stage": self._stage, "start_step": self._start_step, "at_step": self._at_step, "steps": self._steps,
            "resumed": self._resumed, "step_flops": self._step_flops, "started_at": self._segment_start,
            "time": self._since, "wall_s": self._since - self._segment_start,
            "seconds": dict(self._seconds),
        }  # fmt: skip

    def flush(self) -> None:
        """Appends the open segment's cumulative line."""
        if self._stage is None:
            return
        self._log.write(json.dumps(self.line()) + "\n")  # rolled on an object store: O(1) per write


def _union_length(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of `spans` clipped to [lo, hi] (nested compiles are counted once)."""
    clipped = sorted((max(s, lo), min(e, hi)) for s, e in spans if e > lo and s < hi)
    total, end = 0.0, lo
    for s, e in clipped:
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def read_goodput(workdir: PathLike, warn: Any = None) -> list[dict[str, Any]]:
    """The last line of every (process, start, stage) segment under WORKDIR/goodput, oldest first; [] if none."""
    directory = as_path(workdir) / GOODPUT_DIR
    if not directory.exists():
        return []
    last: dict[tuple[int, str, str], dict[str, Any]] = {}
    for path in sorted(p for p in directory.glob("process_*.jsonl") if log_parts(p)):
        for number, line in enumerate(read_log_lines(path), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if warn is not None and line.strip():
                    warn(f"{path}:{number}: skipped an unparsable goodput line; cut by a kill?")
                continue
            if row.get("event") == "goodput":
                last[(int(row["process"]), str(row["attempt"]), str(row["stage"]))] = row
    return sorted(last.values(), key=lambda r: (r["process"], r["started_at"]))


def _lost(segment: dict[str, Any], next_start_step: int | None) -> int:
    if next_start_step is None:
        return 0
    return max(0, min(int(segment["at_step"]) - int(next_start_step), int(segment["steps"])))


def goodput_by_stage(segments: list[dict[str, Any]], process: int | None = 0) -> dict[str, dict[str, Any]]:
    """Per stage (in first-seen order): wall and productive seconds, badput by cause, redone steps and FLOPs,
    XLA compile and trace seconds per start, and goodput; over one process (None: all processes, summed)."""
    chosen = [s for s in segments if process is None or int(s["process"]) == process]
    out: dict[str, dict[str, Any]] = {}
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for s in chosen:
        by_key.setdefault((int(s["process"]), str(s["stage"])), []).append(s)
    for (_, stage), runs in by_key.items():
        runs.sort(key=lambda r: r["started_at"])
        acc = out.setdefault(stage, {
            "wall_seconds": 0.0, "productive_seconds": 0.0, "badput_seconds": dict.fromkeys(BADPUT_CAUSES, 0.0),
            "redone_steps": 0, "redone_flops": 0.0, "compile_seconds": [], "trace_seconds": [], "starts": 0,
        })  # fmt: skip
        for i, seg in enumerate(runs):
            following = runs[i + 1]["start_step"] if i + 1 < len(runs) else None
            lost = _lost(seg, following)
            seconds = seg["seconds"]
            step_s = float(seconds.get("step", 0.0))
            lost_s = step_s * lost / seg["steps"] if seg["steps"] else 0.0
            acc["wall_seconds"] += float(seg["wall_s"])
            acc["productive_seconds"] += step_s - lost_s
            for cause in CAUSES:
                if cause != "step":
                    acc["badput_seconds"][cause] += float(seconds.get(cause, 0.0))
            acc["badput_seconds"]["lost_progress"] += lost_s
            acc["redone_steps"] += lost
            acc["redone_flops"] += lost * float(seg["step_flops"])
            acc["compile_seconds"].append(float(seconds.get("compile", 0.0)))
            acc["trace_seconds"].append(float(seconds.get("trace", 0.0)))
            acc["starts"] += 1
    for acc in out.values():
        acc["goodput"] = acc["productive_seconds"] / acc["wall_seconds"] if acc["wall_seconds"] > 0 else None
    return out


def run_goodput(per_stage: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stages of one run (one process) together: wall, productive, badput by cause, goodput."""
    wall = sum(s["wall_seconds"] for s in per_stage.values())
    productive = sum(s["productive_seconds"] for s in per_stage.values())
    badput = {c: sum(s["badput_seconds"][c] for s in per_stage.values()) for c in BADPUT_CAUSES}
    return {
        "wall_seconds": wall, "productive_seconds": productive, "badput_seconds": badput,
        "goodput": productive / wall if wall > 0 else None,
        "redone_steps": sum(s["redone_steps"] for s in per_stage.values()),
        "redone_flops": sum(s["redone_flops"] for s in per_stage.values()),
    }  # fmt: skip
