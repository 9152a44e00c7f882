"""The name and layout map between diffusers' WanTransformer3DModel state dict and our parameter tree.

Torch Linear weights are [out, in]; ours are [in, out]. Conv3d [D, C, pt, ph, pw] is ours [pt, ph, pw, C, D].
Blocks are stacked on a leading layer axis under `blocks/layers/block` when scanned.
"""

from __future__ import annotations

import numpy as np

from wamjax.models.config import ModelConfig

# (diffusers suffix, our path inside a block, kind)
_BLOCK_ENTRIES = []
for _attn in ("attn1", "attn2"):
    for _proj in ("to_q", "to_k", "to_v"):
        _BLOCK_ENTRIES += [(f"{_attn}.{_proj}.weight", (_attn, _proj, "kernel"), "linear"),
                           (f"{_attn}.{_proj}.bias", (_attn, _proj, "bias"), "same")]
    _BLOCK_ENTRIES += [
        (f"{_attn}.to_out.0.weight", (_attn, "to_out", "kernel"), "linear"),
        (f"{_attn}.to_out.0.bias", (_attn, "to_out", "bias"), "same"),
        (f"{_attn}.norm_q.weight", (_attn, "norm_q", "scale"), "same"),
        (f"{_attn}.norm_k.weight", (_attn, "norm_k", "scale"), "same"),
    ]
_BLOCK_ENTRIES += [
    ("ffn.net.0.proj.weight", ("ffn", "proj_in", "kernel"), "linear"),
    ("ffn.net.0.proj.bias", ("ffn", "proj_in", "bias"), "same"),
    ("ffn.net.2.weight", ("ffn", "proj_out", "kernel"), "linear"),
    ("ffn.net.2.bias", ("ffn", "proj_out", "bias"), "same"),
    ("scale_shift_table", ("scale_shift_table",), "same"),
]
_NORM2_ENTRIES = [("norm2.weight", ("norm2", "scale"), "same"), ("norm2.bias", ("norm2", "bias"), "same")]
# Image-conditioned (I2V) backbone: the image keys/values of every cross-attention and the image embedder.
_IMAGE_BLOCK_ENTRIES = [
    ("attn2.add_k_proj.weight", ("attn2", "add_k_proj", "kernel"), "linear"),
    ("attn2.add_k_proj.bias", ("attn2", "add_k_proj", "bias"), "same"),
    ("attn2.add_v_proj.weight", ("attn2", "add_v_proj", "kernel"), "linear"),
    ("attn2.add_v_proj.bias", ("attn2", "add_v_proj", "bias"), "same"),
    ("attn2.norm_added_k.weight", ("attn2", "norm_added_k", "scale"), "same"),
]
_IMAGE_EMBEDDER = "condition_embedder.image_embedder"
_IMAGE_TOP_ENTRIES = []
for _torch_name, _ours in (("norm1", "norm1"), ("ff.net.0.proj", "proj_in"), ("ff.net.2", "proj_out"),
                           ("norm2", "norm2")):
    _is_norm = _ours.startswith("norm")
    _path = ("condition_embedder", "image_embedder", _ours)
    _IMAGE_TOP_ENTRIES += [
        (f"{_IMAGE_EMBEDDER}.{_torch_name}.weight", (*_path, "scale" if _is_norm else "kernel"),
         "same" if _is_norm else "linear"),
        (f"{_IMAGE_EMBEDDER}.{_torch_name}.bias", (*_path, "bias"), "same"),
    ]
_POS_EMBED_ENTRY = (f"{_IMAGE_EMBEDDER}.pos_embed", ("condition_embedder", "image_embedder", "pos_embed"), "same")

_TOP_ENTRIES = [
    ("patch_embedding.weight", ("patch_embedding", "kernel"), "conv3d"),
    ("patch_embedding.bias", ("patch_embedding", "bias"), "same"),
    ("scale_shift_table", ("scale_shift_table",), "same"),
    ("proj_out.weight", ("proj_out", "kernel"), "linear"),
    ("proj_out.bias", ("proj_out", "bias"), "same"),
]
for _mlp in ("time_embedder", "text_embedder"):
    for _lin in ("linear_1", "linear_2"):
        _TOP_ENTRIES += [
            (f"condition_embedder.{_mlp}.{_lin}.weight", ("condition_embedder", _mlp, _lin, "kernel"), "linear"),
            (f"condition_embedder.{_mlp}.{_lin}.bias", ("condition_embedder", _mlp, _lin, "bias"), "same"),
        ]
_TOP_ENTRIES += [
    ("condition_embedder.time_proj.weight", ("condition_embedder", "time_proj", "kernel"), "linear"),
    ("condition_embedder.time_proj.bias", ("condition_embedder", "time_proj", "bias"), "same"),
]


def name_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str, int | None]]:
    """Every (diffusers key, our path, kind, layer index or None) of the video backbone."""
    top_entries = list(_TOP_ENTRIES)
    if cfg.image_conditioned:
        top_entries += _IMAGE_TOP_ENTRIES + ([_POS_EMBED_ENTRY] if cfg.pos_embed_seq_len is not None else [])
    entries = [(k, p, kind, None) for k, p, kind in top_entries]
    block_entries = _BLOCK_ENTRIES + (_NORM2_ENTRIES if cfg.cross_attn_norm else [])
    block_entries += _IMAGE_BLOCK_ENTRIES if cfg.image_conditioned else []
    for i in range(cfg.num_layers):
        for suffix, path, kind in block_entries:
            if cfg.scan_layers:
                entries.append((f"blocks.{i}.{suffix}", ("blocks", "layers", "block", *path), kind, i))
            else:
                entries.append((f"blocks.{i}.{suffix}", ("blocks", f"layers_{i}", "block", *path), kind, None))
    return entries


def torch_to_ours(value: np.ndarray, kind: str) -> np.ndarray:
    """Converts one diffusers tensor (as numpy) to our layout."""
    if kind == "linear":
        return value.T
    if kind == "conv3d":
        return value.transpose(2, 3, 4, 1, 0)
    return value


def ours_to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    """Converts one of our arrays (as numpy) to diffusers' layout."""
    if kind == "linear":
        return value.T
    if kind == "conv3d":
        return value.transpose(4, 3, 0, 1, 2)
    return value
