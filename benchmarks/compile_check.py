"""Will the published shapes fit? `python -m wamjax.compile_check` over models x clips x TPU topologies x attention
kernels x remat policies, one table. Compile only: nothing runs, no TPU is needed (libtpu describes the chips).

  python benchmarks/compile_check.py                                  # every row (long: minutes per 14B row)
  python benchmarks/compile_check.py --sizes=wan1.3b --clips=81x480x832 --topologies=v5p-8 --remats=full
  python benchmarks/compile_check.py ... --config.model.num_layers=4   # --config.x=y applies to every row
  python benchmarks/compile_check.py --jobs=2 --markdown=rows.md       # two compiles at once; a RESULTS.md table

Each row is the video_pretrain train step of configs/wam.py:size=SIZE on a clip of FRAMESxHEIGHTxWIDTH, with
latents from a cache (the config's default), 512 text tokens, bfloat16 compute, FSDP over every chip and a
global batch of `--batch_per_chip` x chips. Columns: fits (or why not), GiB per chip (arguments + outputs +
temporaries; "+" when the compiler gave up counting), compile seconds, roofline step time, what bounds it
(compute at peak FLOP/s, HBM traffic, collective traffic over the chip's ICI) and MFU bound, and XLA's FLOPs
over the analytic count (`--xla_flops` compiles 1- and 2-layer copies of the step for it, as XLA counts a scanned
loop's body once).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def run_row(size: str, clip: str, topology: str, kernel: str, remat: str, batch_per_chip: int, xla_flops: bool,
            timeout: int, extra: list[str]) -> dict:
    """One compile_check run as a subprocess (its own memory, its own timeout); its JSON report or the error."""
    from wamjax.compile_steps import TOPOLOGY_ALIASES, canonical_topology

    frames, height, width = (int(x) for x in clip.split("x"))
    dims = canonical_topology(TOPOLOGY_ALIASES.get(topology, topology))[2]
    chips = 1
    for d in dims:
        chips *= d
    cmd = [
        sys.executable, "-m", "wamjax.compile_check",
        f"--config={REPO}/configs/wam.py:size={size},stage=video_pretrain",
        f"--topology={topology}", "--format=json", f"--{'' if xla_flops else 'no'}xla_flops",
        f"--config.data.num_frames={frames}", f"--config.data.resolution=({height},{width})",
        f"--config.data.batch_size={batch_per_chip * chips}", f"--config.model.attention={kernel}",
        f"--config.model.remat_policy={remat}", *extra,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"compile over {timeout} s", "wall_s": time.perf_counter() - start}
    text = out.stdout
    if out.returncode in (0, 1) and "{" in text:
        row = json.loads(text[text.index("{"):])
        row["wall_s"] = time.perf_counter() - start
        return row
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:") or "Error" in ln]
    return {"error": (lines[-1] if lines else out.stderr.strip().splitlines()[-1])[:160],
            "wall_s": time.perf_counter() - start}


def format_row(key: tuple, row: dict) -> str:
    size, clip, topology, kernel, remat = key
    head = f"{size:8s} {clip:12s} {topology:8s} {kernel:12s} {remat:22s}"
    if "error" in row:
        return f"{head} error: {row['error']}"
    if row["fits"]:
        fits = "fits"
    else:
        fits = "OOM (compiler)" if row["out_of_memory"] else "no"
    gib = f"{row['total_bytes'] / GIB:.1f}{'+' if row['out_of_memory'] else ''}"
    ratio = "-" if row["flop_ratio"] is None else f"{row['flop_ratio']:.3f}"
    host = f" host {row['host_bytes'] / GIB:.1f} GiB" if row.get("host_bytes") else ""
    return (f"{head} {row['global_batch'] // row['chips']:>3d} {fits:>15s} {gib:>9s} {row['compile_s']:8.1f} "
            f"{row['step_time_bound_s']:9.2f} {row.get('bound', '-'):>13s} {100 * row['mfu_bound']:6.1f}% "
            f"{ratio:>7s}{host}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="wan1.3b,wan14b")
    parser.add_argument("--clips", default="81x480x832,81x720x1280", help="FRAMESxHEIGHTxWIDTH, comma-separated")
    parser.add_argument("--topologies", default="v5p-8,v5p-64,v5p-128,v6e-16")
    parser.add_argument("--kernels", default="auto,dot_product", help="model.attention values, comma-separated")
    parser.add_argument("--remats", default="full,offload_block_inputs", help="model.remat_policy values")
    parser.add_argument("--batch_per_chip", type=int, default=1)
    parser.add_argument("--xla_flops", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--noxla_flops", dest="xla_flops", action="store_false", help="as --no-xla_flops")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--markdown", default="", help="also write the rows as a markdown table to this file")
    parser.add_argument("--jobs", type=int, default=1, help="rows compiled at once (each is one process)")
    args, overrides = parser.parse_known_args()  # the rest: --config.x=y flags for every row
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        parser.error(f"unknown arguments {bad}; only --config.x=y overrides pass through")
    split = lambda s: [x for x in s.split(",") if x]
    keys = list(itertools.product(split(args.sizes), split(args.clips), split(args.topologies), split(args.kernels),
                                  split(args.remats)))
    print(f"{'size':8s} {'clip':12s} {'topology':8s} {'kernel':12s} {'remat':22s} {'b/c':>3s} {'fits':>15s} "
          f"{'GiB/chip':>9s} {'compile':>8s} {'step>=s':>9s} {'bound':>13s} {'MFU<=':>7s} {'XLA/an':>7s}", flush=True)
    rows: dict[tuple, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_row, *key, args.batch_per_chip, args.xla_flops, args.timeout, overrides): key
                   for key in keys}
        for future in concurrent.futures.as_completed(futures):  # printed as they finish
            key = futures[future]
            rows[key] = {"size": key[0], "clip": key[1], "topology": key[2], "kernel": key[3], "remat": key[4],
                         **future.result()}
            print(format_row(key, rows[key]), flush=True)
    ordered = [rows[key] for key in keys]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ordered, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(ordered))
        print(f"wrote {args.markdown}", flush=True)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a RESULTS.md table."""
    out = ["| model | clip (tokens) | topology (chips) | kernel | remat | batch / chip | result | GiB per chip "
           "(args / temps / total of HBM) | compile s | step >= | bound (compute / HBM / ICI s) | MFU <= | "
           "XLA / analytic FLOPs |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frames, height, width = (int(x) for x in r["clip"].split("x"))
        tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
        head = f"| {r['size']} | {r['clip']} ({tokens:,}) | {r['topology']}"
        if "error" in r:
            out.append(f"{head} | {r['kernel']} | {r['remat']} | - | error: {r['error']} | - | - | - | - | - | - |")
            continue
        head += f" ({r['chips']}) | {r['kernel']} | {r['remat']} | {r['global_batch'] // r['chips']}"
        oom = bool(r["out_of_memory"])
        plus = "+" if oom else ""
        if r["fits"]:
            result = "fits"
        elif oom:
            result = "does not fit (compiler refused)"
        else:
            result = f"does not fit: {(r['total_bytes'] - r['hbm_bytes']) / GIB:.1f} GiB over"
        if r.get("host_bytes"):
            result += f"; {r['host_bytes'] / GIB:.1f} GiB in host memory"
        gib = (f"{r['argument_bytes'] / GIB:.2f} / {r['temp_bytes'] / GIB:.1f}{plus} / "
               f"{r['total_bytes'] / GIB:.1f}{plus} of {r['hbm_bytes'] / GIB:.0f}")
        ratio = "-" if r["flop_ratio"] is None else f"{r['flop_ratio']:.3f}"
        if r["flop_ratio"] is not None and r.get("opaque_attention"):
            ratio += " (XLA does not count the splash kernel)"
        step = "-" if oom else f"{r['step_time_bound_s']:.2f} s"
        mfu = "-" if oom else f"{100 * r['mfu_bound']:.1f}%"
        comm = r.get("communication_s")
        bound = "-" if oom else (f"{r.get('bound', 'compute')} ({r.get('compute_s', 0.0):.2f} / "
                                 f"{r.get('memory_s', 0.0):.2f} / {'-' if comm is None else f'{comm:.2f}'})")
        out.append(f"{head} | {result} | {gib} | {r['compile_s']:.0f} | {step} | {bound} | {mfu} | {ratio} |")
    return "\n".join(out) + "\n"

if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
