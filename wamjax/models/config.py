"""Model configuration: one frozen dataclass shared by the DiT, the action modules and the exporters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

LORA_TARGETS = ("q", "k", "v", "o", "cross", "ffn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the world-action model; the backbone fields mirror diffusers' WanTransformer3DModel."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    # Image conditioning (Wan2.1-I2V): CLIP image tokens of width `image_dim` are embedded and read by every
    # block's cross-attention through its own keys/values (`added_kv_proj_dim`, the model width); None = T2V.
    # `pos_embed_seq_len` adds a learned position embedding to the image tokens (Wan2.1 FLF2V).
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    pos_embed_seq_len: int | None = None
    # Action / proprio tokens (absent in the pure video backbone).
    action_dim: int = 7
    proprio_dim: int = 8
    max_action_tokens: int = 256
    action_frames_per_latent: int = 4
    # Attention layout: "bidirectional" (Wan) or "chunk_causal" (DreamZero-style chunks of latent frames).
    attention_layout: str = "bidirectional"
    chunk_latent_frames: int = 1
    # What a chunk-causal model's noisy chunk attends to in training: "teacher_forcing" (a clean copy of the
    # earlier chunks, as the KV-cache rollout sees them) or "diffusion_forcing" (the earlier chunks of the one
    # noisy copy, each at its own noise level). Ignored by bidirectional models.
    history: str = "teacher_forcing"
    # Execution.
    attention: str = "dot_product"  # kernel: see wamjax.models.attention.known_kernels()
    attention_block_q: int = 512  # query / key block sizes of the block-based kernels (blockwise)
    attention_block_kv: int = 512
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"
    # LoRA adapters (run config `lora.*`): rank 0 = none; alpha 0 = the rank (scale 1); targets of q, k, v, o (self-
    # attention projections), cross (the text cross-attention's q, k, v, o), ffn (both FFN projections).
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: str = "q,k,v,o,ffn"

    def lora_target_set(self) -> tuple[str, ...]:
        """The layers `lora_targets` names."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def lora_rank_for(self, target: str) -> int:
        """The adapter rank of layer kind `target` (one of LORA_TARGETS): `lora_rank`, or 0 when not targeted."""
        return self.lora_rank if self.lora_rank and target in self.lora_target_set() else 0

    @property
    def lora_scale(self) -> float:
        """alpha / rank (1 when alpha is 0)."""
        return (self.lora_alpha or self.lora_rank) / max(self.lora_rank, 1)

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"lora.rank={self.lora_rank}; expected >= 1 (or 0 for no adapters)")
        unknown = sorted(set(self.lora_target_set()) - set(LORA_TARGETS))
        if unknown or (self.lora_rank and not self.lora_target_set()):
            raise ValueError(f"lora.targets={self.lora_targets!r}: {unknown or 'none'} name no layer; expected any "
                             f"of {list(LORA_TARGETS)}")
        if self.history not in ("teacher_forcing", "diffusion_forcing"):
            raise ValueError(f"model.history={self.history!r}; expected 'teacher_forcing' or 'diffusion_forcing'")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                f"model.image_dim={self.image_dim} and model.added_kv_proj_dim={self.added_kv_proj_dim}: "
                "image conditioning needs both set (or both None for text-to-video)"
            )
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
            raise ValueError(
                f"model.added_kv_proj_dim={self.added_kv_proj_dim}; Wan's image embedder outputs the model width "
                f"{self.dim}, so it must equal num_attention_heads * attention_head_dim"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError(f"model.pos_embed_seq_len={self.pos_embed_seq_len} needs model.image_dim")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def image_conditioned(self) -> bool:
        """True for the image-to-video (I2V) backbone: CLIP image tokens in every cross-attention."""
        return self.image_dim is not None

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a mapping, naming any key that is not a model field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        kwargs = dict(values)
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(int(p) for p in kwargs["patch_size"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def diffusers_config(self) -> dict[str, Any]:
        """The `config.json` of the equivalent diffusers WanTransformer3DModel."""
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": self.image_dim,
            "added_kv_proj_dim": self.added_kv_proj_dim,
            "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": self.pos_embed_seq_len,
        }


# Published Wan 2.1 transformer sizes, plus a CPU-sized one.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_attention_heads=2, attention_head_dim=24, ffn_dim=96, num_layers=2, text_dim=32, freq_dim=32
    ),
    "small": dict(
        num_attention_heads=4, attention_head_dim=32, ffn_dim=256, num_layers=4, text_dim=64, freq_dim=64
    ),
    # The CPU lab model (configs/lab.py): 2 heads of 64 over 48-channel pixel-patch latents (vae.size=pixels4);
    # width and depth from the sweep in benchmarks/RESULTS.md.
    "lab": dict(
        num_attention_heads=2, attention_head_dim=64, ffn_dim=512, num_layers=4, text_dim=64, freq_dim=64,
        in_channels=48, out_channels=48,
    ),
    "wan1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    # Wan2.1-I2V-14B-480P: 16 noisy + 4 mask + 16 conditioning-frame latent channels in, CLIP ViT-H/14 tokens.
    "wan14b-i2v": dict(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, in_channels=36,
        image_dim=1280, added_kv_proj_dim=5120,
    ),
    # Wan2.2-TI2V-5B: the same transformer over the Wan 2.2 VAE's 48 latent channels (16x spatial compression);
    # text-image-to-video holds the first latent frame clean at t = 0 (per-frame timesteps, no CLIP tower).
    "wan2.2-ti2v-5b": dict(
        num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, in_channels=48,
        out_channels=48,
    ),
    # Its CPU-sized sibling (tiny widths, 48 channels).
    "tiny-ti2v": dict(
        num_attention_heads=2, attention_head_dim=24, ffn_dim=96, num_layers=2, text_dim=32, freq_dim=32,
        in_channels=48, out_channels=48,
    ),
    # The tiny size with image conditioning (16 + 4 + 16 input channels, as Wan2.1-I2V).
    "tiny-i2v": dict(
        num_attention_heads=2, attention_head_dim=24, ffn_dim=96, num_layers=2, text_dim=32, freq_dim=32,
        in_channels=36, image_dim=32, added_kv_proj_dim=48,
    ),
}

# Parameter counts of the published checkpoints as diffusers' WanTransformer3DModel counts them (T2V 1.3B and
# 14B; Wan2.1-I2V-14B-480P, whose image embedder and per-block image keys/values add 2.1B to the 14B T2V;
# Wan2.2-TI2V-5B).
PUBLISHED_PARAM_COUNTS = {"wan1.3b": 1_418_996_800, "wan14b": 14_288_491_584, "wan14b-i2v": 16_394_878_784,
                          "wan2.2-ti2v-5b": 4_999_787_712}


def model_config_from_run(run_config: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of a run config (a ConfigDict or its saved dict): `model` plus the data's proprio size."""
    model = run_config["model"]
    values = dict(model.to_dict() if hasattr(model, "to_dict") else model)
    data = run_config.get("data") if hasattr(run_config, "get") else None
    if data is not None and "proprio_dim" in data:
        values["proprio_dim"] = int(data["proprio_dim"])
    lora = run_config.get("lora") if hasattr(run_config, "get") else None
    if lora:  # the run's LoRA adapters are part of its model
        values.update(lora_rank=int(lora.get("rank", 0)), lora_alpha=float(lora.get("alpha", 0.0)),
                      lora_targets=str(lora.get("targets", "q,k,v,o,ffn")))
    return ModelConfig.from_dict(values)
