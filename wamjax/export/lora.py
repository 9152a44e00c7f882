"""LoRA adapters of a checkpoint for PyTorch users: merged into the base weights, or as a PEFT/diffusers adapter file.

`OUT/lora/pytorch_lora_weights.safetensors` holds, for every adapted backbone layer, `transformer.<diffusers module>.
lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (the adapter's alpha / rank folded into B), the key layout
`diffusers.WanTransformer3DModel.load_lora_adapter(OUT/lora)` reads, so base + adapter equals the merged weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from wamjax.checkpoint.wan_import import WeightImportError
from wamjax.checkpoint.wan_names import name_map
from wamjax.models.config import ModelConfig
from wamjax.paths import PathLike, as_path

LORA_DIR = "lora"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_LEAVES = ("lora_a", "lora_b")
MODES = ("merge", "adapters")


def has_lora(params: Mapping[str, Any]) -> bool:
    """Whether any layer of `params` carries an adapter."""
    return any(k in LORA_LEAVES or (isinstance(v, Mapping) and has_lora(v)) for k, v in params.items())


def _delta(node: Mapping[str, Any], scale: float) -> np.ndarray:
    a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
    return scale * np.matmul(a, b)  # [..., in, r] @ [..., r, out]: stacked layers keep their leading axis


def merge_lora(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` with every adapter folded into its kernel (kernel + scale * A B) and the adapters removed."""

    def merge(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: merge(v) for k, v in node.items() if k not in LORA_LEAVES}
        if "lora_a" in node:
            kernel = np.asarray(node["kernel"])
            out["kernel"] = (kernel.astype(np.float32) + _delta(node, cfg.lora_scale)).astype(kernel.dtype)
        return out

    return merge(params)


def strip_lora(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` without the adapters (the frozen base)."""
    return {k: strip_lora(v) if isinstance(v, Mapping) else v for k, v in params.items() if k not in LORA_LEAVES}


def _node(params: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any] | None:
    node: Any = params
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def peft_state(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The adapters as diffusers/PEFT tensors (torch layouts, float32), keyed `transformer.<module>.lora_A.weight`
    and `...lora_B.weight`."""
    state: dict[str, np.ndarray] = {}
    for key, path, kind, layer in name_map(cfg):
        if kind != "linear" or path[-1] != "kernel":
            continue
        node = _node(params, path[:-1])
        if node is None or "lora_a" not in node:
            continue
        a, b = np.asarray(node["lora_a"], np.float32), cfg.lora_scale * np.asarray(node["lora_b"], np.float32)
        if layer is not None:
            a, b = a[layer], b[layer]
        module = "transformer." + key.removesuffix(".weight")
        state[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
        state[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
    if not state and has_lora(params):
        raise WeightImportError("the checkpoint's adapters sit on no backbone layer the diffusers name map knows")
    return state


def write_adapters(out_dir: PathLike, cfg: ModelConfig, params: Mapping[str, Any]) -> str:
    """Writes `out_dir/lora/pytorch_lora_weights.safetensors`; returns its path."""
    from safetensors.numpy import save

    path = as_path(out_dir) / LORA_DIR / LORA_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(save(peft_state(cfg, params), metadata={"format": "pt"}))
    return str(path)


def export_weights(
    out_dir: PathLike, cfg: ModelConfig, params: Mapping[str, Any], mode: str
) -> tuple[Mapping[str, Any], Mapping[str, Any], list[str]]:
    """(weights for the diffusers transformer, the whole model's merged weights, adapter files written) of an
    export in `mode` ("merge" or "adapters": the frozen base, with the adapters written beside it)."""
    if not has_lora(params):
        return params, params, []
    merged = merge_lora(cfg, params)
    if mode == "adapters":
        return strip_lora(params), merged, [write_adapters(out_dir, cfg, params)]
    return merged, merged, []
