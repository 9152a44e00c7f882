"""Analytic FLOPs of the world-action model's forward pass, per component, over a `SequenceShape`.

Convention: a multiply-add is 2 FLOPs and an elementwise op is 1 FLOP per element, as XLA's cost analysis
counts them, so `wamjax.flops.xla` can check these numbers against the compiled forward. Transcendentals
(exp, tanh, rsqrt, sin, cos) are not FLOPs in that convention and are not counted here either.

Two counts, as the field names them (MaxText, PaLM's MFU):
  model FLOPs     what the model needs: self-attention scores over the (query, key) pairs the layout's mask lets
                  a valid query see (`attention_pairs`), no remat recompute. Budgets, the ledger, metrics.jsonl
                  and MFU use these.
  hardware FLOPs  what the configured kernel computes: every pair of the sequence for dense kernels
                  (dot_product, xla, cudnn), the block pairs it does not skip for blockwise / splash (a partly
                  masked block counts whole), plus what rematerialization recomputes. Roofline step times and the
                  "hardware utilization" column use these; XLA's cost analysis checks them.
For a bidirectional layout without padding both equal the dense count.

Components of the forward pass (FLOPs for the whole batch):
  patch_embedding              latent patches -> tokens
  self_attention_projections   q, k, v, out matmuls of every block (with biases)
  self_attention_scores        QK^T and AV plus softmax/scale/mask over the pairs counted (visible ones for
                               model FLOPs, computed ones for a kernel's hardware FLOPs)
  cross_attention_projections  q/out over video+action tokens, k/v over text tokens (and, I2V, over the
                               image tokens), every block
  cross_attention_scores       scores and AV against the text tokens (and the image tokens), plus softmax
  ffn                          the two FFN matmuls and the GELU
  modulation                   timestep MLPs and 6-way projections per token group, per-block table adds
  text_projection              the DiT's text embedder MLP (the frozen text encoder is separate), and for
                               I2V the image embedder (norms + MLP over the CLIP tokens)
  action_encoders              action and proprio token encoders and their embeddings
  action_decoder               action velocity head
  output_head                  final modulated norm and the video projection
  norms_and_elementwise        layer/RMS norms, RoPE, modulate/gate/residual arithmetic inside blocks
The frozen parts a training step runs (`wamjax.flops.encoders`) and one training step of a stage, backward and
remat recompute included, are counted in `wamjax.flops.stage`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from wamjax.flops import attention_pairs
from wamjax.models.attention_mask import AttentionMask
from wamjax.models.config import ModelConfig
from wamjax.models.token_layout import history_sizes, make_token_layout, trains_teacher_forced
from wamjax.stages import StageSpec

# Wan 2.1 VAE compression: causal 4x in time, 8x in space, 16 latent channels.
VAE_TIME_COMPRESSION = 4
VAE_SPACE_COMPRESSION = 8
MODES = ("video", "joint")
COMPONENTS = (
    "patch_embedding",
    "self_attention_projections",
    "self_attention_scores",
    "cross_attention_projections",
    "cross_attention_scores",
    "ffn",
    "modulation",
    "text_projection",
    "action_encoders",
    "action_decoder",
    "output_head",
    "norms_and_elementwise",
    "lora_adapters",
)
# Elementwise FLOPs per element, counted from the ops the model code issues (see module docstring).
_LAYER_NORM = 5  # centre, square, two mean reductions, scale
_LAYER_NORM_AFFINE = 7  # plus learned scale and bias
_RMS_NORM = 4  # square, mean reduction, scale by rsqrt, learned gain
_ROPE = 3  # 4 multiplies and 2 adds per rotated pair
_GELU_TANH = 8  # x^3, two scalings, add, 1 + tanh, halve, times x (tanh itself is a transcendental)
_SILU = 1  # the multiply; the sigmoid is a transcendental
_SOFTMAX = 4  # max, subtract, sum, divide (exp is a transcendental)


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """Tokens per sample of one forward pass."""

    latent_shape: tuple[int, int, int]  # (frames, height, width) of VAE latents
    video: int
    action: int
    proprio: int
    padding: int
    text: int
    video_groups: int  # modulation groups of the video tokens (one per patched latent frame)
    image: int = 0  # CLIP image tokens (image-conditioned backbone only)
    # Teacher forcing (model.history): the clean copy of the chunks before the last, at t=0.
    history_video: int = 0
    history_action: int = 0
    teacher_forcing: bool = False

    @property
    def sequence(self) -> int:
        """Length of the joint self-attention sequence."""
        return self.video + self.action + self.proprio + self.history_video + self.history_action + self.padding

    @property
    def groups(self) -> int:
        # The history copy reads one t=0 group per modality.
        history = int(self.teacher_forcing) + (1 if self.history_action else 0)
        return self.video_groups + self.action + (1 if self.proprio else 0) + history


def latent_shape_for(num_frames: int, resolution: tuple[int, int] | list[int],
                     spatial_compression: int = VAE_SPACE_COMPRESSION) -> tuple[int, int, int]:
    """(frames, height, width) of the VAE latents of `num_frames` frames at `resolution` pixels (the Wan VAE's
    8x spatial compression unless told otherwise, e.g. 4 for `vae.size=pixels4`)."""
    height, width = (int(r) for r in resolution)
    if num_frames < 1 or (num_frames - 1) % VAE_TIME_COMPRESSION:
        raise ValueError(
            f"data.num_frames={num_frames}; expected 1 + {VAE_TIME_COMPRESSION}k frames "
            "(causal VAE time compression)"
        )
    sc = int(spatial_compression)
    if height % sc or width % sc:
        raise ValueError(f"data.resolution={(height, width)}; expected height and width divisible by {sc}")
    return 1 + (num_frames - 1) // VAE_TIME_COMPRESSION, height // sc, width // sc


@dataclasses.dataclass(frozen=True)
class SequenceShape:
    """What one sample's joint sequence is made of, for every FLOP count (analytic and XLA's): the clip whose
    latent grid the video tokens come from, its camera views (tokens layout), actions, proprio tokens, the
    teacher-forced history, text and image tokens, and the padding to the mesh's sequence axis."""

    mode: str  # "video" | "joint"
    num_frames: int
    resolution: tuple[int, int]
    text_length: int
    num_actions: int | None = None  # actions per sample in joint mode; None: one per frame transition (T - 1)
    num_proprio: int = 1  # proprio tokens in joint mode: one, or one per chunk
    views: int = 1  # camera views as separate token groups (tokens view layout)
    teacher_forcing: bool | None = None  # the clean history copy; None: what training runs (`trains_teacher_forced`)
    image_tokens: int = 0  # CLIP tokens per sample (image-conditioned backbone)
    pad_to_multiple: int = 1
    spatial_compression: int = VAE_SPACE_COMPRESSION

    @classmethod
    def of_stage(cls, spec: StageSpec, *, pad_to_multiple: int = 1) -> SequenceShape:
        """The sequence a training step of `spec`'s stage runs."""
        views = spec.views or 1
        return cls(
            mode=spec.mode, num_frames=spec.clip.num_frames, resolution=spec.clip.resolution,
            text_length=spec.text_length, num_actions=spec.clip.actions, num_proprio=spec.clip.states or 1,
            views=views,
            image_tokens=0 if spec.image_encoder is None else spec.image_encoder.num_tokens * views,
            pad_to_multiple=pad_to_multiple, spatial_compression=int(spec.vae.spatial_compression),
        )

    def replace(self, **changes: Any) -> SequenceShape:
        return dataclasses.replace(self, **changes)


def token_counts(model_cfg: ModelConfig, shape: SequenceShape) -> TokenCounts:
    """Tokens per sample of `shape`: video tokens after patching (of each view); the actions (default T-1) and
    proprio tokens in joint mode; with teacher forcing (default: what training runs) the clean history copy (all
    views of each history frame)."""
    mode, num_frames, resolution = shape.mode, shape.num_frames, shape.resolution
    num_actions, num_proprio, views = shape.num_actions, shape.num_proprio, shape.views
    teacher_forcing, pad_to_multiple = shape.teacher_forcing, shape.pad_to_multiple
    spatial_compression, text_length, image_tokens = shape.spatial_compression, shape.text_length, shape.image_tokens
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    frames, height, width = latent_shape_for(num_frames, resolution, spatial_compression)
    pt, ph, pw = model_cfg.patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(
            f"latent shape {(frames, height, width)} (from {num_frames} frames at {tuple(resolution)}) "
            f"is not divisible by model.patch_size={tuple(model_cfg.patch_size)}"
        )
    grid = (frames // pt, height // ph, width // pw)
    video = grid[0] * grid[1] * grid[2] * int(views)
    action = (num_frames - 1 if num_actions is None else int(num_actions)) if mode == "joint" else 0
    proprio = int(num_proprio) if mode == "joint" else 0
    if teacher_forcing is None:
        teacher_forcing = trains_teacher_forced(model_cfg)
    history_video = history_action = 0
    if teacher_forcing:
        history_frames, history_action = history_sizes(model_cfg, grid[0], action)
        history_video = history_frames * grid[1] * grid[2] * int(views)
    padding = (-(video + action + proprio + history_video + history_action)) % max(int(pad_to_multiple), 1)
    return TokenCounts(
        latent_shape=(frames, height, width),
        video=video,
        action=action,
        proprio=proprio,
        padding=padding,
        text=int(text_length),
        video_groups=grid[0],
        image=int(image_tokens) if model_cfg.image_conditioned else 0,
        history_video=history_video,
        history_action=history_action,
        teacher_forcing=bool(teacher_forcing),
    )


def dense_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    """FLOPs of a linear layer with bias over `tokens` rows."""
    return 2.0 * tokens * fan_in * fan_out + tokens * fan_out


def _time_embedding(cfg: ModelConfig, groups: int) -> float:
    """TimeEmbedding (sinusoid -> linear -> SiLU -> linear) plus SiLU and the 6-way time_proj, per group."""
    d = cfg.dim
    per_group = (
        cfg.freq_dim // 2  # timestep times frequencies
        + dense_flops(1, cfg.freq_dim, d)
        + _SILU * d
        + dense_flops(1, d, d)
        + _SILU * d
        + dense_flops(1, d, 6 * d)
    )
    return groups * per_group


def _modulate(cfg: ModelConfig, seq: int, groups: int) -> float:
    """`norm(x) * (1 + scale) + shift`: the `1 +` is per group when a single group is broadcast."""
    one_plus = cfg.dim if groups == 1 else seq * cfg.dim
    return one_plus + 2.0 * seq * cfg.dim


def _attention_scores(cfg: ModelConfig, pairs: int, masked: bool) -> float:
    """QK^T and AV matmuls plus the scale, optional mask and softmax over `pairs` (query, key) pairs, all heads."""
    scores = cfg.num_attention_heads * pairs
    matmuls = 2 * (2.0 * pairs * cfg.dim)
    return matmuls + scores * (1 + _SOFTMAX + (1 if masked else 0))


def self_attention_pairs(
    cfg: ModelConfig, shape: SequenceShape, *, kernel: str = "dot_product", block_q: int | None = None,
    block_kv: int | None = None,
) -> attention_pairs.AttentionPairs:
    """The (query, key) pairs of one sample's self-attention (every block runs the same): those its layout's mask
    shows a valid query, and those `kernel` computes at `block_q` x `block_kv` (default: model.attention_block_*)."""
    tok = token_counts(cfg, shape)
    pad_to_multiple, views = shape.pad_to_multiple, shape.views
    block_q = cfg.attention_block_q if block_q is None else block_q
    block_kv = cfg.attention_block_kv if block_kv is None else block_kv
    if cfg.attention_layout == "chunk_causal":
        layout = make_token_layout(cfg, tok.latent_shape, tok.action, tok.proprio, pad_to_multiple,
                                   teacher_forcing=tok.teacher_forcing, num_views=views)
        if layout.length != tok.sequence:
            raise AssertionError(f"token layout of {layout.length} tokens; token_counts says {tok.sequence}")
        return attention_pairs.layout_pairs(layout, kernel, block_q, block_kv)
    # Bidirectional: one chunk, so only padding is masked (as `layout_attention_mask` masks it).
    s, valid = tok.sequence, np.arange(tok.sequence) < tok.sequence - tok.padding
    mask = None if tok.padding == 0 else AttentionMask.create(np.zeros(s, np.int32), kv_valid=valid)
    return attention_pairs.attention_pairs(mask, s, s, kernel, block_q, block_kv, q_valid=valid)


def forward_flops(model_cfg: ModelConfig, shape: SequenceShape, *, batch: int = 1, kernel: str | None = None
                  ) -> dict[str, float]:
    """Forward FLOPs of `wam_forward` on `batch` samples of `shape`, per component (module docstring) and "total".

    Model FLOPs by default; with `kernel` (a resolved model.attention, e.g. "splash") the hardware FLOPs of that
    kernel at the model's block sizes (no remat: see `train_step_flops`)."""
    cfg = model_cfg
    tok = token_counts(cfg, shape)
    d, layers, s, text = cfg.dim, cfg.num_layers, tok.sequence, tok.text
    patch = math.prod(cfg.patch_size)
    groups = tok.groups
    masked = cfg.attention_layout == "chunk_causal" or tok.padding > 0

    c = dict.fromkeys(COMPONENTS, 0.0)
    c["patch_embedding"] = dense_flops(tok.video + tok.history_video, patch * cfg.in_channels, d)
    c["self_attention_projections"] = layers * 4 * dense_flops(s, d, d)
    pairs = self_attention_pairs(cfg, shape, kernel=kernel or "dot_product")
    c["self_attention_scores"] = layers * _attention_scores(cfg, pairs.visible if kernel is None else pairs.computed,
                                                            masked)
    c["cross_attention_projections"] = layers * (2 * dense_flops(s, d, d) + 2 * dense_flops(text, d, d))
    c["cross_attention_scores"] = layers * _attention_scores(cfg, s * text, masked=False)
    c["ffn"] = layers * (
        dense_flops(s, d, cfg.ffn_dim) + _GELU_TANH * s * cfg.ffn_dim + dense_flops(s, cfg.ffn_dim, d)
    )
    c["modulation"] = (
        _time_embedding(cfg, groups)
        + layers * 6 * groups * d  # scale_shift_table + per-group modulation, every block
        + 2 * groups * d  # output scale_shift_table + temb
    )
    c["text_projection"] = dense_flops(text, cfg.text_dim, d) + _GELU_TANH * text * d + dense_flops(text, d, d)
    if tok.image:
        image, image_dim = tok.image, cfg.image_dim
        c["cross_attention_projections"] += layers * 2 * dense_flops(image, d, d)
        c["cross_attention_scores"] += layers * (_attention_scores(cfg, s * image, masked=False) + s * d)
        c["norms_and_elementwise"] += layers * _RMS_NORM * image * d  # norm_added_k
        c["text_projection"] += (
            _LAYER_NORM_AFFINE * image * (image_dim + d) + dense_flops(image, image_dim, image_dim)
            + _GELU_TANH * image * image_dim + dense_flops(image, image_dim, d)
        )
    if tok.action:
        encoded = tok.action + tok.history_action
        c["action_encoders"] = (
            dense_flops(encoded, cfg.action_dim, d)
            + _SILU * encoded * d
            + dense_flops(encoded, d, d)
            + 2 * encoded * d  # position and type embeddings
        )
        c["action_decoder"] = dense_flops(tok.action, d, cfg.action_dim)
    if tok.proprio:
        c["action_encoders"] += (
            dense_flops(tok.proprio, cfg.proprio_dim, d) + _SILU * tok.proprio * d + dense_flops(tok.proprio, d, d)
            + tok.proprio * d  # type embedding
        )
    c["output_head"] = (
        _LAYER_NORM * s * d + _modulate(cfg, s, groups) + dense_flops(tok.video, d, patch * cfg.out_channels)
    )
    per_block_elementwise = (
        _LAYER_NORM * s * d
        + _modulate(cfg, s, groups)  # norm1
        + _RMS_NORM * 2 * s * d
        + _ROPE * 2 * s * d  # self-attention q/k norms and rotation
        + 2 * s * d  # gate and residual
        + (_LAYER_NORM_AFFINE * s * d if cfg.cross_attn_norm else 0)  # norm2
        + _RMS_NORM * (s + text) * d  # cross-attention q/k norms
        + s * d  # residual
        + _LAYER_NORM * s * d
        + _modulate(cfg, s, groups)  # norm3
        + 2 * s * d  # gate and residual
    )
    c["norms_and_elementwise"] += layers * per_block_elementwise
    c["lora_adapters"] = lora_forward_flops(cfg, s, text)
    out = {name: float(value) * batch for name, value in c.items()}
    out["total"] = float(sum(out.values()))
    return out


def lora_forward_flops(cfg: ModelConfig, seq: int, text: int) -> float:
    """Forward FLOPs of the LoRA adapters on one sample: x A then (x A) B, the scale and the add, per adapted layer."""
    r, d, layers = cfg.lora_rank, cfg.dim, cfg.num_layers
    if not r:
        return 0.0
    adapter = lambda tokens, fan_in, fan_out: dense_flops(tokens, fan_in, r) + dense_flops(tokens, r, fan_out) + (
        2 * tokens * fan_out)
    total = sum(adapter(seq, d, d) for t in ("q", "k", "v", "o") if cfg.lora_rank_for(t))
    if cfg.lora_rank_for("cross"):
        total += 2 * adapter(seq, d, d) + 2 * adapter(text, d, d)
    if cfg.lora_rank_for("ffn"):
        total += adapter(seq, d, cfg.ffn_dim) + adapter(seq, cfg.ffn_dim, d)
    return float(layers * total)


def block_forward_flops(components: dict[str, float]) -> float:
    """The share of a forward that runs inside the transformer blocks (what rematerialization recomputes)."""
    in_blocks = (
        "self_attention_projections",
        "self_attention_scores",
        "cross_attention_projections",
        "cross_attention_scores",
        "ffn",
        "norms_and_elementwise",
        "lora_adapters",
    )
    return float(sum(components[name] for name in in_blocks))
