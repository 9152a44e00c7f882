"""Peak dense bf16 FLOP/s per accelerator, for MFU."""

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


def detect_device_kind() -> str:
    """The device_kind of the first JAX device (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu")."""
    import jax

    return str(jax.devices()[0].device_kind)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one `device_kind` device (None: detect); None when unknown (CPU, ...)."""
    kind = detect_device_kind() if device_kind is None else device_kind
    lowered = kind.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key in lowered:
            return peak
    return None


def describe_peak(device_kind: str | None = None) -> str:
    """A one-line description for logs: the device kind and its peak, or that MFU is unknown for it."""
    kind = detect_device_kind() if device_kind is None else device_kind
    peak = peak_flops_per_device(kind)
    if peak is None:
        return f"device {kind!r}: peak FLOP/s unknown, MFU not reported"
    return f"device {kind!r}: peak {peak / 1e12:.0f} TFLOP/s bf16 dense"
