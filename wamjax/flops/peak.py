"""Peak dense bf16 FLOP/s, HBM bandwidth and HBM capacity per accelerator, for MFU and roofline bounds."""

from __future__ import annotations

# (substring of the lower-cased jax device_kind, peak dense bf16 FLOP/s); the first match wins, so more
# specific names come first ("v5 lite" before "v5", "h100 pcie" before "h100").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12),  # TPU v6e reports "TPU v6 lite"
    ("v6e", 918e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),  # TPU v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
)


# (substring of the lower-cased device_kind, HBM bytes/s per chip), matched like PEAK_BF16_FLOPS.
HBM_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("v6 lite", 1640e9),
    ("v6e", 1640e9),
    ("v5 lite", 819e9),
    ("v5e", 819e9),
    ("v5p", 2765e9),
    ("tpu v5", 2765e9),
    ("tpu v4", 1228e9),
    ("h100 pcie", 2000e9),
    ("h100", 3350e9),
    ("h200", 4800e9),
    ("gh200", 4000e9),
    ("a100", 2039e9),
)

# (substring of the lower-cased device_kind, bidirectional inter-chip interconnect bytes/s per chip, all links), as
# Cloud TPU documents them; v4's is not listed there in these units, so it is left unknown.
ICI_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("v6 lite", 800e9),
    ("v6e", 800e9),
    ("v5 lite", 400e9),
    ("v5e", 400e9),
    ("v5p", 1200e9),
    ("tpu v5", 1200e9),
)

# (substring of the lower-cased device_kind, HBM bytes per chip); TPU sizes as Cloud TPU documents them.
HBM_BYTES: tuple[tuple[str, int], ...] = (
    ("v6 lite", 32 * 2**30),
    ("v6e", 32 * 2**30),
    ("v5 lite", 16 * 2**30),
    ("v5e", 16 * 2**30),
    ("v5p", 95 * 2**30),
    ("tpu v5", 95 * 2**30),
    ("tpu v4", 32 * 2**30),
    ("h100 pcie", 80 * 10**9),
    ("h100", 80 * 10**9),
    ("h200", 141 * 10**9),
    ("gh200", 96 * 10**9),
    ("a100", 80 * 10**9),
)


def _lookup(table: tuple[tuple[str, float], ...], device_kind: str) -> float | None:
    lowered = device_kind.lower()
    for key, value in table:
        if key in lowered:
            return value
    return None


def hbm_bandwidth_per_device(device_kind: str) -> float | None:
    """HBM bandwidth in bytes/s of one `device_kind` chip; None when unknown."""
    return _lookup(HBM_BANDWIDTH, device_kind)


def ici_bandwidth_per_device(device_kind: str) -> float | None:
    """Bidirectional ICI bytes/s of one `device_kind` chip over all its links; None when unknown."""
    return _lookup(ICI_BANDWIDTH, device_kind)


def hbm_bytes_per_device(device_kind: str) -> int | None:
    """HBM capacity in bytes of one `device_kind` chip; None when unknown."""
    value = _lookup(HBM_BYTES, device_kind)
    return None if value is None else int(value)


def detect_device_kind() -> str:
    """The device_kind of the first JAX device (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu")."""
    import jax

    return str(jax.devices()[0].device_kind)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one `device_kind` device (None: detect); None when unknown (CPU, ...)."""
    kind = detect_device_kind() if device_kind is None else device_kind
    return _lookup(PEAK_BF16_FLOPS, kind)


def describe_peak(device_kind: str | None = None) -> str:
    """A one-line description for logs: the device kind and its peak, or that MFU is unknown for it."""
    kind = detect_device_kind() if device_kind is None else device_kind
    peak = peak_flops_per_device(kind)
    if peak is None:
        return f"device {kind!r}: peak FLOP/s unknown, MFU not reported"
    return f"device {kind!r}: peak {peak / 1e12:.0f} TFLOP/s bf16 dense"
