"""Analytic FLOPs of the frozen Wan VAE encoders, 2.1 and 2.2 (the CLIP image encoder's count is
`wamjax.models.clip.encode_flops`).

Same convention as `wamjax.flops.analytic`: a multiply-add is 2 FLOPs; multiply-adds against padding zeros are not
counted, as XLA does not count them.
"""

from __future__ import annotations

import math
from typing import Any

from wamjax.models.patch_vae import PatchVAEConfig


def _taps(n: int, k: int, stride: int = 1, pad_lo: int = 0, pad_hi: int = 0) -> tuple[int, int]:
    """(outputs, kernel taps that land on real input, summed over outputs) of a 1-D convolution.

    XLA does not count multiply-adds against padding zeros, so neither do we.
    """
    outputs = (n + pad_lo + pad_hi - k) // stride + 1
    taps = sum(1 for o in range(outputs) for j in range(k) if 0 <= o * stride - pad_lo + j < n)
    return outputs, taps


def _conv3d(
    shape: tuple[int, int, int],
    kernel: tuple[int, int, int],
    cin: int,
    cout: int,
    stride: tuple[int, int, int] = (1, 1, 1),
    causal: bool = True,
) -> tuple[float, tuple[int, int, int]]:
    """FLOPs (with bias) and output (T, H, W) of `vae._conv3d`: causal in time, same-padded in space."""
    dims = []
    for axis, (n, k, s) in enumerate(zip(shape, kernel, stride, strict=True)):
        lo, hi = ((k - 1, 0) if causal else (0, 0)) if axis == 0 else ((k - 1) // 2, (k - 1) // 2)
        dims.append(_taps(n, k, s, lo, hi))
    out = tuple(d[0] for d in dims)
    flops = 2.0 * math.prod(d[1] for d in dims) * cin * cout + math.prod(out) * cout
    return flops, out  # type: ignore[return-value]


def vae_encode_flops(
    vae_config: Any, num_frames: int, resolution: tuple[int, int] | list[int], batch: int = 1
) -> float:
    """Convolution and attention FLOPs of `vae_encode` on `batch` clips (norms and activations excluded); 0 for
    the pixel patch encoder (a reshape)."""
    from wamjax.models.vae import _encoder_layers, _residual_down_blocks  # the layer lists: one source of truth

    if isinstance(vae_config, PatchVAEConfig):
        return 0.0
    cfg = vae_config
    p = cfg.patch_size or 1
    shape = (int(num_frames), *(int(r) // p for r in resolution))
    total, shape = _conv3d(shape, (3, 3, 3), cfg.in_channels, cfg.base_dim)

    def res(shape, cin: int, cout: int) -> float:
        flops = _conv3d(shape, (3, 3, 3), cin, cout)[0] + _conv3d(shape, (3, 3, 3), cout, cout)[0]
        return flops + (_conv3d(shape, (1, 1, 1), cin, cout)[0] if cin != cout else 0.0)

    def attn(shape, dim: int) -> float:
        t, hw = shape[0], shape[1] * shape[2]
        return t * (2.0 * hw * dim * 4 * dim + 4 * dim * hw + 2 * (2.0 * hw * hw * dim))

    def resample(shape, dim: int, mode: str) -> tuple[float, tuple[int, int, int]]:
        t, h, w = shape
        (h_out, h_taps), (w_out, w_taps) = _taps(h, 3, 2, 0, 1), _taps(w, 3, 2, 0, 1)
        flops = t * (2.0 * h_taps * w_taps * dim * dim + h_out * w_out * dim)
        shape = (t, h_out, w_out)
        if mode == "downsample3d" and t > 1:
            conv, reduced = _conv3d(shape, (3, 1, 1), dim, dim, stride=(2, 1, 1), causal=False)
            flops += conv
            shape = (1 + reduced[0], h_out, w_out)
        return flops, shape

    dim = cfg.base_dim
    if cfg.is_residual:
        # The averaging shortcuts are means (not counted, as norms are not).
        for cin, cout, mode in _residual_down_blocks(cfg):
            for j in range(cfg.num_res_blocks):
                total += res(shape, cin if j == 0 else cout, cout)
            if mode:
                flops, shape = resample(shape, cout, mode)
                total += flops
            dim = cout
    for kind, cin, cout, mode in () if cfg.is_residual else _encoder_layers(cfg):
        if kind == "res":
            total += res(shape, cin, cout)
        elif kind == "attn":
            total += attn(shape, cout)
        else:
            flops, shape = resample(shape, cout, mode)
            total += flops
        dim = cout
    total += res(shape, dim, dim) + attn(shape, dim) + res(shape, dim, dim)  # mid block
    flops, shape = _conv3d(shape, (3, 3, 3), dim, 2 * cfg.z_dim)  # conv_out
    total += flops + _conv3d(shape, (1, 1, 1), 2 * cfg.z_dim, 2 * cfg.z_dim)[0]  # quant_conv
    return float(total) * batch
