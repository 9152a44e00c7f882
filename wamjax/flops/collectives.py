"""The collectives of a compiled program, from its HLO text: bytes each chip sends and receives, per kind.

A ring collective over a group of n chips with a full buffer of S bytes moves, per chip (sent + received):
all-gather and reduce-scatter 2 S (n-1)/n, all-reduce (a reduce-scatter then an all-gather) 4 S (n-1)/n,
all-to-all 2 S (n-1)/n, a collective-permute 2 S (sent and received). S is read from the op's result (a
reduce-scatter's is n times its result; an asynchronous `-start` that returns its operands beside its results has
them taken out). Ops inside loop bodies are counted once, as XLA's cost analysis counts them; asynchronous pairs
count their `-start` only.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"\s(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn|fnuz|b11fnuz)?)?)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\})")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")


def _bytes(dtype: str, dims: str) -> float:
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
        return 0.0
    return size * math.prod(int(d) for d in dims.split(",") if d)


def _group_size(line: str, num_devices: int) -> int:
    listed = _GROUPS_LIST.search(line)
    if listed:
        return max(1, len([d for d in listed.group(1).strip("{}").split(",") if d]))
    iota = _GROUPS_IOTA.search(line)
    if iota:
        return int(iota.group(1).split(",")[-1])
    mesh = _GROUPS_MESH.search(line)
    if mesh:  # replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}: the named axes' product
        sizes = {name: int(size) for name, size in _MESH_AXIS.findall(mesh.group(1))}
        return math.prod(sizes.get(name.strip().strip("'"), 1) for name in mesh.group(2).split(",") if name.strip())
    return num_devices  # replica_groups={} or absent: every device


def collective_traffic(hlo_text: str, num_devices: int) -> dict[str, float]:
    """{kind: bytes one chip sends and receives} over the program's collectives (kinds with none left out)."""
    traffic: dict[str, float] = {}
    for line in hlo_text.splitlines():
        if " = " not in line:
            continue
        match = _OP.search(line)
        if not match:
            continue
        kind, start = match.group(1), bool(match.group(2))
        result = line[line.index(" = ") + 3:match.start()]
        size = sum(_bytes(dtype, dims) for dtype, dims in _SHAPE.findall(result))
        n = 2 if kind == "collective-permute" else _group_size(line, num_devices)
        if n <= 1:
            continue
        if start and kind == "all-gather":  # (operands, results): the operands are 1/n of the results
            size *= n / (n + 1)
        elif start and kind == "collective-permute":  # (operand, result, contexts)
            size /= 2
        if kind == "collective-permute":
            moved = 2.0 * size
        else:
            full = size * n if kind == "reduce-scatter" else size
            moved = (4.0 if kind == "all-reduce" else 2.0) * full * (n - 1) / n
        if moved:
            traffic[kind] = traffic.get(kind, 0.0) + moved
    return traffic
