"""What did a run cost? One row per (workdir, stage), from WORKDIR/metrics.jsonl alone.

  python -m wamjax.flops.report --workdir=DIR [--workdir=DIR2 ...] [--format=table|csv|json] [--plot=FILE.png]

A resumed run re-logs the steps after its last checkpoint, so for each (stage, step) the LAST line written is
kept. The stage totals (FLOPs, steps, samples, tokens, wall time) are the ledger's cumulative values on the
stage's last logged step: the ledger is restored with each checkpoint, so nothing is counted twice. A stage
that ended between log intervals is completed from its `stage_end` event (which carries the final FLOPs).
Other event lines, lines without "step", and unparsable lines (a write cut by preemption) are skipped.

Goodput (when the run wrote WORKDIR/goodput/, see `wamjax.flops.goodput`): per stage, the share of wall time
spent in productive steps, the badput seconds by cause (init, restore, trace, compile, data, eval, checkpoint
and lost progress: steps computed again after a restart), the redone steps and their FLOPs, and the XLA
compile (and trace) seconds of each start. `flops` are productive FLOPs (what budgets count); `spent_flops`
adds the redone ones. `spike_skips` counts the updates `optim.skip_step_on_spike` skipped (None: no guard).

FLOPs are model FLOPs (self-attention over the pairs the mask shows a query; what budgets count), MFU is model
FLOP/s over peak (MaxText's definition); hardware FLOPs and "hardware utilization" (HFU) are what the kernels
computed, remat included. Logs written before hardware FLOPs were logged show none.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any

from absl import app, flags

from wamjax.flops import goodput as goodput_lib
from wamjax.flops.ledger import format_flops
from wamjax.paths import PathLike, as_path, read_log_lines

METRICS_FILE = "metrics.jsonl"
COLUMNS = (
    "workdir", "stage", "steps", "samples", "tokens", "flops", "hardware_flops", "budget_flops", "budget_fraction",
    "wall_time_s", "mean_mfu", "mean_hardware_utilization", "first_step", "last_step", "goodput",
    "goodput_wall_s", "redone_steps", "redone_flops", "spent_flops", "spike_skips",
)  # fmt: skip


def read_log(path: PathLike, warn: Any = None) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(step lines, deduplicated and sorted by step; the last `stage_end` event per stage) of a metrics.jsonl.

    For each (stage, step) the last line written counts. `warn(message)` hears of skipped unparsable lines.
    """
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected the metrics.jsonl a training run writes")
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    max_step: dict[str, int] = {}
    stage_ends: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(read_log_lines(path), 1):  # every rolled part on an object store
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if warn is not None:
                warn(f"{path}:{number}: skipped an unparsable line ({e.msg}); cut by preemption?")
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        if row.get("event") == "stage_end" and "stage" in row:
            stage_ends[str(row["stage"])] = row
        if "event" in row:
            continue
        if "stage" not in row:
            raise KeyError(f"{path}:{number}: a step line has no 'stage'; expected the trainer's schema")
        stage, step = str(row["stage"]), int(row["step"])
        if step <= max_step.get(stage, -1):
            # The run resumed from an earlier checkpoint: what the interrupted attempt logged from this
            # step on was redone, so only the new lines count.
            for key in [key for key in latest if key[0] == stage and key[1] >= step]:
                del latest[key]
        max_step[stage] = step
        latest[(stage, step)] = row
    rows = [latest[key] for key in sorted(latest, key=lambda k: k[1])]
    return rows, stage_ends


def read_metrics(path: PathLike, warn: Any = None) -> list[dict[str, Any]]:
    """Step lines of a metrics.jsonl, deduplicated, by step: for each (stage, step) the last line written."""
    return read_log(path, warn)[0]


def _last(rows: list[dict[str, Any]], key: str, default: Any = None) -> Any:
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key]
    return default


def stage_summaries(
    workdir: str, rows: list[dict[str, Any]], stage_ends: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One summary per stage, in the order the stages first appear.

    A stage can end on a step that was not logged (a budget hit between log intervals); its `stage_end`
    event carries the ledger's final FLOPs, and the unlogged steps are added at the last logged per-step
    samples, tokens and step time.
    """
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_stage.setdefault(str(row["stage"]), []).append(row)
    out = []
    for stage, stage_rows in by_stage.items():
        stage_rows.sort(key=lambda r: int(r["step"]))
        steps = _last(stage_rows, "stage_steps")
        if steps is None:  # no ledger fields: count the steps from the global step numbers
            steps = int(stage_rows[-1]["step"]) - int(stage_rows[0]["step"]) + 1
        flops = _last(stage_rows, "stage_flops")
        if flops is None and _last(stage_rows, "step_flops") is not None:
            flops = float(_last(stage_rows, "step_flops")) * steps
        hardware = _last(stage_rows, "stage_hardware_flops")
        samples, tokens = _last(stage_rows, "stage_samples"), _last(stage_rows, "stage_tokens")
        wall = _last(stage_rows, "wall_time_s")
        last_step = int(stage_rows[-1]["step"])
        end = (stage_ends or {}).get(stage)
        if end is not None and int(end["step"]) > last_step and end.get("stage_flops") is not None:
            extra = int(end["step"]) - last_step
            if steps:
                samples = None if samples is None else samples + extra * samples / steps
                tokens = None if tokens is None else tokens + extra * tokens / steps
            if wall is not None:
                wall += extra * float(_last(stage_rows, "step_time_s", 0.0))
            steps, flops, last_step = steps + extra, float(end["stage_flops"]), int(end["step"])
            hardware = end.get("stage_hardware_flops", hardware)
        budget = float(_last(stage_rows, "budget_flops", 0.0) or 0.0)
        spike_skips = _last(stage_rows, "stage_spike_skips")  # None: the run had no loss-spike guard
        mfus = [float(r["mfu"]) for r in stage_rows if r.get("mfu") is not None]
        hfus = [float(r["hardware_utilization"]) for r in stage_rows if r.get("hardware_utilization") is not None]
        out.append({
            "workdir": workdir,
            "stage": stage,
            "steps": int(steps),
            "samples": None if samples is None else int(round(samples)),
            "tokens": None if tokens is None else int(round(tokens)),
            "flops": None if flops is None else float(flops),
            "hardware_flops": None if hardware is None else float(hardware),
            "budget_flops": budget,
            "budget_fraction": float(flops) / budget if budget > 0 and flops is not None else None,
            "wall_time_s": wall,
            "mean_mfu": sum(mfus) / len(mfus) if mfus else None,
            "mean_hardware_utilization": sum(hfus) / len(hfus) if hfus else None,
            "first_step": int(stage_rows[0]["step"]),
            "last_step": last_step,
            "spike_skips": None if spike_skips is None else int(spike_skips),
        })  # fmt: skip
    return out


def add_goodput(summaries: list[dict[str, Any]], segments: list[dict[str, Any]]) -> None:
    """Adds process 0's goodput fields to each stage summary of one workdir (None where nothing was recorded)."""
    per_stage = goodput_lib.goodput_by_stage(segments, process=0)
    for s in summaries:
        g = per_stage.get(s["stage"])
        s["goodput"] = None if g is None else g["goodput"]
        s["goodput_wall_s"] = None if g is None else g["wall_seconds"]
        s["productive_seconds"] = None if g is None else g["productive_seconds"]
        s["badput_seconds"] = None if g is None else g["badput_seconds"]
        s["redone_steps"] = None if g is None else g["redone_steps"]
        s["redone_flops"] = None if g is None else g["redone_flops"]
        s["compile_seconds"] = None if g is None else g["compile_seconds"]
        s["trace_seconds"] = None if g is None else g["trace_seconds"]
        s["spent_flops"] = None if g is None or s["flops"] is None else s["flops"] + g["redone_flops"]


def run_summary(workdir: str, segments: list[dict[str, Any]]) -> dict[str, Any]:
    """One workdir's goodput over its stages: process 0's, and each process's beside it."""
    processes = sorted({int(seg["process"]) for seg in segments})
    per_process = [{"process": p, **goodput_lib.run_goodput(goodput_lib.goodput_by_stage(segments, p)),
                    "stages": goodput_lib.goodput_by_stage(segments, p)} for p in processes]
    lead = goodput_lib.run_goodput(goodput_lib.goodput_by_stage(segments, 0))
    starts = sorted({seg["attempt"] for seg in segments if int(seg["process"]) == 0},
                    key=lambda a: min(s["started_at"] for s in segments if s["attempt"] == a))
    per_start = lambda cause: [sum(s["seconds"].get(cause, 0.0) for s in segments
                                   if s["attempt"] == a and int(s["process"]) == 0) for a in starts]
    return {"workdir": workdir, **lead, "compile_seconds": per_start("compile"), "trace_seconds": per_start("trace"),
            "processes": per_process}


def summarize(workdirs: list[str], warn: Any = None) -> tuple[list[dict[str, Any]], dict[str, list[dict]]]:
    """(summary rows for all workdirs, deduplicated metric rows per workdir)."""
    return summarize_runs(workdirs, warn)[:2]


def summarize_runs(workdirs: list[str], warn: Any = None
                   ) -> tuple[list[dict[str, Any]], dict[str, list[dict]], list[dict[str, Any]]]:
    """(summary rows for all workdirs, deduplicated metric rows per workdir, one goodput summary per workdir)."""
    summaries, rows_by_workdir, runs = [], {}, []
    for workdir in workdirs:
        rows, stage_ends = read_log(as_path(workdir) / METRICS_FILE, warn)
        rows_by_workdir[workdir] = rows
        stage_rows = stage_summaries(workdir, rows, stage_ends)
        segments = goodput_lib.read_goodput(workdir, warn)
        add_goodput(stage_rows, segments)
        summaries.extend(stage_rows)
        runs.append(run_summary(workdir, segments))
    return summaries, rows_by_workdir, runs


def _human_count(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A fixed-width table for people: `model FLOPs` are the productive ones the budget counts, `spent FLOPs`
    add the steps a restart computed again, `goodput` is the stage's productive share of its wall time."""
    header = (
        "workdir", "stage", "steps", "samples", "tokens", "model FLOPs", "hardware FLOPs", "budget", "used",
        "spent FLOPs", "goodput", "wall time", "mean MFU", "mean HFU",
    )  # fmt: skip
    lines = []
    for s in summaries:
        lines.append((
            s["workdir"], s["stage"], str(s["steps"]), _human_count(s["samples"]), _human_count(s["tokens"]),
            format_flops(s["flops"]), format_flops(s["hardware_flops"]),
            format_flops(s["budget_flops"]) if s["budget_flops"] else "none",
            f"{100 * s['budget_fraction']:.1f}%" if s["budget_fraction"] is not None else "-",
            format_flops(s.get("spent_flops")),  # productive plus redone: what the chips computed
            f"{100 * s['goodput']:.1f}%" if s.get("goodput") is not None else "-",
            _duration(s["wall_time_s"]),
            f"{100 * s['mean_mfu']:.1f}%" if s["mean_mfu"] is not None else "unknown",
            f"{100 * s['mean_hardware_utilization']:.1f}%" if s["mean_hardware_utilization"] is not None
            else "unknown",
        ))  # fmt: skip
    return _render(header, lines)


def _render(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                                   enumerate(zip(row, widths, strict=True)))
    return "\n".join([render(header), "  ".join("-" * w for w in widths), *map(render, lines)])


def _share(value: float | None, total: float | None) -> str:
    return f"{100 * value / total:.1f}%" if value is not None and total else "-"


def format_goodput_table(summaries: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """Where the wall time went, per stage and run: goodput, badput shares by cause, redone work, compiles."""
    header = ("workdir", "stage", "wall time", "goodput", *goodput_lib.BADPUT_CAUSES, "redone steps",
              "redone FLOPs", "compile s per start", "spike skips")
    lines = []

    def line(workdir: str, stage: str, g: dict[str, Any], compiles: list[float], spikes: Any) -> tuple[str, ...]:
        wall = g["wall_seconds"]
        return (workdir, stage, _duration(wall), _share(g["productive_seconds"], wall),
                *(_share(g["badput_seconds"][c], wall) for c in goodput_lib.BADPUT_CAUSES), str(g["redone_steps"]),
                format_flops(g["redone_flops"]), ", ".join(f"{c:.1f}" for c in compiles),
                "-" if spikes is None else str(spikes))

    for run in runs:
        if not run["processes"]:
            continue
        lead = next(p for p in run["processes"] if p["process"] == 0)
        spikes = []
        for s in summaries:
            if s["workdir"] == run["workdir"] and s["stage"] in lead["stages"]:
                g = lead["stages"][s["stage"]]
                lines.append(line(run["workdir"], s["stage"], g, g["compile_seconds"], s["spike_skips"]))
                spikes += [] if s["spike_skips"] is None else [s["spike_skips"]]
        lines.append(line(run["workdir"], "(run)", run, run["compile_seconds"], sum(spikes) if spikes else None))
    if not lines:
        return ""
    return _render(header, lines)


def format_csv(summaries: list[dict[str, Any]]) -> str:
    """CSV with raw numbers (FLOPs, seconds, fractions) for spreadsheets."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in summaries:
        writer.writerow({k: "" if s[k] is None else s[k] for k in COLUMNS})
    return buffer.getvalue()


def _plot_goodput(ax: Any, runs: list[dict[str, Any]]) -> None:
    """One horizontal bar per stage and run: productive seconds, then each badput cause, stacked."""
    labels, parts = [], []
    for run in runs:
        lead = next(p for p in run["processes"] if p["process"] == 0)
        prefix = f"{as_path(run['workdir']).name}/" if len(runs) > 1 else ""
        for stage, g in lead["stages"].items():
            good = f"{100 * g['goodput']:.0f}%" if g["goodput"] is not None else "-"
            labels.append(f"{prefix}{stage} ({good} goodput)")
            parts.append([g["productive_seconds"], *(g["badput_seconds"][c] for c in goodput_lib.BADPUT_CAUSES)])
    names = ("productive", *goodput_lib.BADPUT_CAUSES)
    left = [0.0] * len(labels)
    for k, name in enumerate(names):
        widths = [p[k] for p in parts]
        ax.barh(range(len(labels)), widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_xlabel("wall seconds (all starts)")
    ax.set_title("where the time went")
    ax.legend(fontsize="x-small", ncol=4)


def plot(
    rows_by_workdir: dict[str, list[dict[str, Any]]], path: str, summaries: list[dict[str, Any]] | None = None,
    runs: list[dict[str, Any]] | None = None,
) -> None:
    """Cumulative FLOPs per stage over the run's wall time, each against its budget (dashed), and, with `runs`
    (from `summarize_runs`), a bar per stage of its wall time split into productive time and badput.

    `summaries` (from `summarize`) supply each stage's final point; by default they come from the rows alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in (runs or []) if run["processes"]]
    if runs:
        fig, (ax, bars) = plt.subplots(2, 1, figsize=(8, 7.5), gridspec_kw={"height_ratios": [3, 2]})
        _plot_goodput(bars, runs)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
    if summaries is None:
        summaries = [s for workdir, rows in rows_by_workdir.items() for s in stage_summaries(workdir, rows)]
    by_workdir = {workdir: [s for s in summaries if s["workdir"] == workdir] for workdir in rows_by_workdir}
    run_seconds = [sum(float(s["wall_time_s"] or 0.0) for s in run) for run in by_workdir.values()]
    longest = max(run_seconds, default=0.0)
    scale, unit = (1.0, "s") if longest < 120 else (60.0, "min") if longest < 7200 else (3600.0, "h")
    for workdir, rows in rows_by_workdir.items():
        offset = 0.0  # stages run one after another: each starts where the previous one's wall time ended
        label_prefix = f"{as_path(workdir).name}/" if len(rows_by_workdir) > 1 else ""
        for s in by_workdir[workdir]:
            stage_rows = [r for r in rows if r["stage"] == s["stage"] and r.get("stage_flops") is not None]
            if not stage_rows:
                continue
            color = next(colors)
            seconds = [offset] + [offset + float(r.get("wall_time_s") or 0.0) for r in stage_rows]
            times = [t / scale for t in seconds]
            spent = [0.0] + [float(r["stage_flops"]) for r in stage_rows]
            if s["flops"] is not None and s["flops"] > spent[-1]:  # completed from the stage_end event
                times.append((offset + float(s["wall_time_s"] or 0.0)) / scale)
                spent.append(s["flops"])
            ax.plot(times, spent, color=color, marker=".", label=f"{label_prefix}{s['stage']}")
            if s["budget_flops"]:
                ax.hlines(s["budget_flops"], times[0], times[-1], colors=color, linestyles="dashed",
                          label=f"{label_prefix}{s['stage']} budget")
            offset += float(s["wall_time_s"] or 0.0)
    ax.set_xlabel(f"wall time in steps ({unit})")
    ax.set_ylabel("model FLOPs spent in stage")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("FLOPs per stage vs budget")
    fig.tight_layout()
    with as_path(path).open("wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required (repeat it to report several runs)")
    warn = lambda message: print(f"warning: {message}", file=sys.stderr)
    try:
        summaries, rows, runs = summarize_runs(flags.FLAGS.workdir, warn)
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if flags.FLAGS.format == "json":
        print(json.dumps({"stages": summaries, "runs": runs}, indent=2))
    elif flags.FLAGS.format == "csv":
        print(format_csv(summaries), end="")
    else:
        print(format_table(summaries))
        goodput_table = format_goodput_table(summaries, runs)
        if goodput_table:
            print("\nGoodput: productive step time and badput by cause, as shares of wall time")
            print(goodput_table)
    if flags.FLAGS.plot:
        plot(rows, flags.FLAGS.plot, summaries, runs)
        print(f"wrote {flags.FLAGS.plot}", file=sys.stderr)


def define_flags() -> None:
    """Defines the CLI's flags (only when run as a program)."""
    flags.DEFINE_multi_string("workdir", None, "Run directory holding metrics.jsonl (repeatable).")
    flags.DEFINE_enum("format", "table", ["table", "csv", "json"], "Output format.")
    flags.DEFINE_string("plot", "", "Also plot FLOPs per stage vs budget over wall time to FILE.png.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
