"""Analytic FLOPs of the world-action model, per component, and of one training step.

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
Frozen parts that run in a training step are reported separately (`frozen_flops`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from wamjax.flops import attention_pairs
from wamjax.models import clip
from wamjax.models.attention import resolve_attention
from wamjax.models.attention_mask import AttentionMask
from wamjax.models.config import ModelConfig
from wamjax.models.patch_vae import PatchVAEConfig
from wamjax.models.token_layout import history_sizes, make_token_layout, trains_teacher_forced
from wamjax.parallel import context as context_parallel
from wamjax.stages import StageSpec, is_trainable

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


def _dense(tokens: int, fan_in: int, fan_out: int) -> float:
    """A linear layer with bias over `tokens` rows."""
    return 2.0 * tokens * fan_in * fan_out + tokens * fan_out


def _time_embedding(cfg: ModelConfig, groups: int) -> float:
    """TimeEmbedding (sinusoid -> linear -> SiLU -> linear) plus SiLU and the 6-way time_proj, per group."""
    d = cfg.dim
    per_group = (
        cfg.freq_dim // 2  # timestep times frequencies
        + _dense(1, cfg.freq_dim, d)
        + _SILU * d
        + _dense(1, d, d)
        + _SILU * d
        + _dense(1, d, 6 * d)
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
    c["patch_embedding"] = _dense(tok.video + tok.history_video, patch * cfg.in_channels, d)
    c["self_attention_projections"] = layers * 4 * _dense(s, d, d)
    pairs = self_attention_pairs(cfg, shape, kernel=kernel or "dot_product")
    c["self_attention_scores"] = layers * _attention_scores(cfg, pairs.visible if kernel is None else pairs.computed,
                                                            masked)
    c["cross_attention_projections"] = layers * (2 * _dense(s, d, d) + 2 * _dense(text, d, d))
    c["cross_attention_scores"] = layers * _attention_scores(cfg, s * text, masked=False)
    c["ffn"] = layers * (_dense(s, d, cfg.ffn_dim) + _GELU_TANH * s * cfg.ffn_dim + _dense(s, cfg.ffn_dim, d))
    c["modulation"] = (
        _time_embedding(cfg, groups)
        + layers * 6 * groups * d  # scale_shift_table + per-group modulation, every block
        + 2 * groups * d  # output scale_shift_table + temb
    )
    c["text_projection"] = _dense(text, cfg.text_dim, d) + _GELU_TANH * text * d + _dense(text, d, d)
    if tok.image:
        image, image_dim = tok.image, cfg.image_dim
        c["cross_attention_projections"] += layers * 2 * _dense(image, d, d)
        c["cross_attention_scores"] += layers * (_attention_scores(cfg, s * image, masked=False) + s * d)
        c["norms_and_elementwise"] += layers * _RMS_NORM * image * d  # norm_added_k
        c["text_projection"] += (
            _LAYER_NORM_AFFINE * image * (image_dim + d) + _dense(image, image_dim, image_dim)
            + _GELU_TANH * image * image_dim + _dense(image, image_dim, d)
        )
    if tok.action:
        encoded = tok.action + tok.history_action
        c["action_encoders"] = (
            _dense(encoded, cfg.action_dim, d)
            + _SILU * encoded * d
            + _dense(encoded, d, d)
            + 2 * encoded * d  # position and type embeddings
        )
        c["action_decoder"] = _dense(tok.action, d, cfg.action_dim)
    if tok.proprio:
        c["action_encoders"] += (
            _dense(tok.proprio, cfg.proprio_dim, d) + _SILU * tok.proprio * d + _dense(tok.proprio, d, d)
            + tok.proprio * d  # type embedding
        )
    c["output_head"] = (
        _LAYER_NORM * s * d + _modulate(cfg, s, groups) + _dense(tok.video, d, patch * cfg.out_channels)
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
    out = {name: float(value) * batch for name, value in c.items()}
    out["total"] = float(sum(out.values()))
    return out


def block_forward_flops(components: dict[str, float]) -> float:
    """The share of a forward that runs inside the transformer blocks (what rematerialization recomputes)."""
    in_blocks = (
        "self_attention_projections",
        "self_attention_scores",
        "cross_attention_projections",
        "cross_attention_scores",
        "ffn",
        "norms_and_elementwise",
    )
    return float(sum(components[name] for name in in_blocks))


# ----------------------------------------------------------------------------------------------------
# Frozen parts: the Wan VAE encoder.
# ----------------------------------------------------------------------------------------------------


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
    from wamjax.models.vae import _encoder_layers  # the encoder's layer list is the single source of truth

    if isinstance(vae_config, PatchVAEConfig):
        return 0.0
    cfg = vae_config
    shape = (int(num_frames), *(int(r) for r in resolution))
    total, shape = _conv3d(shape, (3, 3, 3), cfg.in_channels, cfg.base_dim)

    def res(shape, cin: int, cout: int) -> float:
        flops = _conv3d(shape, (3, 3, 3), cin, cout)[0] + _conv3d(shape, (3, 3, 3), cout, cout)[0]
        return flops + (_conv3d(shape, (1, 1, 1), cin, cout)[0] if cin != cout else 0.0)

    def attn(shape, dim: int) -> float:
        t, hw = shape[0], shape[1] * shape[2]
        return t * (2.0 * hw * dim * 4 * dim + 4 * dim * hw + 2 * (2.0 * hw * hw * dim))

    dim = cfg.base_dim
    for kind, cin, cout, mode in _encoder_layers(cfg):
        if kind == "res":
            total += res(shape, cin, cout)
        elif kind == "attn":
            total += attn(shape, cout)
        else:
            t, h, w = shape
            (h_out, h_taps), (w_out, w_taps) = _taps(h, 3, 2, 0, 1), _taps(w, 3, 2, 0, 1)
            total += t * (2.0 * h_taps * w_taps * cout * cout + h_out * w_out * cout)
            shape = (t, h_out, w_out)
            if mode == "downsample3d" and t > 1:
                flops, reduced = _conv3d(shape, (3, 1, 1), cout, cout, stride=(2, 1, 1), causal=False)
                total += flops
                shape = (1 + reduced[0], h_out, w_out)
        dim = cout
    total += res(shape, dim, dim) + attn(shape, dim) + res(shape, dim, dim)  # mid block
    flops, shape = _conv3d(shape, (3, 3, 3), dim, 2 * cfg.z_dim)  # conv_out
    total += flops + _conv3d(shape, (1, 1, 1), 2 * cfg.z_dim, 2 * cfg.z_dim)[0]  # quant_conv
    return float(total) * batch


# ----------------------------------------------------------------------------------------------------
# One training step.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step of a stage (whole global batch) and its per-sample parts."""

    forward_per_sample: float  # model FLOPs
    train_per_step: float  # model FLOPs: forward + backward x global batch (`train_multipliers`), no remat recompute
    frozen_per_step: float  # frozen parts run in the step (VAE encoder, text encoder if online)
    hardware_per_step: float  # what the kernel computes, forward + backward, plus what rematerialization recomputes
    dense_per_step: float  # train_per_step with every (query, key) pair counted: the count before masks were read
    batch_size: int
    video_tokens: int
    action_tokens: int
    proprio_tokens: int
    text_tokens: int
    components: dict[str, float]  # forward model FLOPs per sample
    frozen_components: dict[str, float]  # per step
    image_tokens: int = 0  # CLIP tokens per sample (image-conditioned backbone)
    attention_kernel: str = "dot_product"  # the resolved model.attention the hardware count is of
    hardware_components: dict[str, float] | None = None  # forward hardware FLOPs per sample (no remat)
    attention: attention_pairs.AttentionPairs | None = None  # one sample's self-attention pairs, per block

    @property
    def hardware_forward_per_sample(self) -> float:
        """Forward FLOPs per sample as the kernel computes them (no remat recompute)."""
        return float(sum((self.hardware_components or self.components).values()))

    @property
    def train_per_sample(self) -> float:
        return self.train_per_step / self.batch_size

    @property
    def tokens_per_sample(self) -> int:
        """Video plus action tokens: what `tokens_per_s` counts."""
        return self.video_tokens + self.action_tokens


def frozen_flops(spec: StageSpec, batch: int | None = None) -> dict[str, float]:
    """FLOPs of the frozen parts of one step of a stage: VAE encode unless latents are cached; text encoder; for
    the image-conditioned backbone the VAE encode of the conditioning video and the CLIP image encoder. With the
    tokens view layout every camera view is encoded. `batch` defaults to the stage's global batch."""
    batch = spec.clip.batch_size if batch is None else batch
    batch *= spec.views or 1
    vae = 0.0
    if not spec.uses_latents_cache:
        vae = vae_encode_flops(spec.vae, spec.clip.num_frames, spec.clip.resolution, batch)
    # Text embeddings come from a cache or are synthesized; no text encoder runs in the step.
    out = {"vae_encoder": vae, "text_encoder": 0.0}
    if spec.image_encoder is not None:

        out["vae_condition_encoder"] = vae  # the first frame followed by zero frames, encoded like the clip
        out["image_encoder"] = clip.encode_flops(spec.image_encoder, batch)
    return out


_NO_RECOMPUTE_POLICIES = ("none", "everything")

# A parameter of each component (the names `stages.<stage>.trainable` matches against) and the components
# feeding it, for deciding which backward work a partly frozen model does.
_COMPONENT_PARAM = {
    "patch_embedding": "patch_embedding/kernel",
    "text_projection": "condition_embedder/text_embedder/linear_1/kernel",
    "modulation": "condition_embedder/time_embedder/linear_1/kernel",
    "action_encoders": "actions/action_encoder/kernel",
    "self_attention_projections": "blocks/layers/block/attn1/to_q/kernel",
    "cross_attention_projections": "blocks/layers/block/attn2/to_q/kernel",
    "ffn": "blocks/layers/block/ffn/proj_in/kernel",
    "output_head": "proj_out/kernel",
    "action_decoder": "actions/action_decoder/kernel",
}
_INPUT_COMPONENTS = ("patch_embedding", "text_projection", "modulation", "action_encoders")
_BLOCK_WEIGHTS = ("self_attention_projections", "cross_attention_projections", "ffn")
_WEIGHTLESS = ("self_attention_scores", "cross_attention_scores", "norms_and_elementwise")


def train_multipliers(trainable: str) -> dict[str, float]:
    """Training FLOPs per forward FLOP of each component when `trainable` parameters train.

    A trained component costs 3x its forward (forward, activation gradient, weight gradient: the usual
    convention, so `all` is 3x everywhere). A frozen component costs 2x (no weight gradient) where a trained
    parameter lies upstream of it, so activation gradients pass through it, and 1x (forward only) where none
    does. Weightless parts (attention scores, norms) cost 3x wherever gradients pass through them.
    """
    trained = {name: is_trainable(param, trainable) for name, param in _COMPONENT_PARAM.items()}
    into_blocks = any(trained[name] for name in _INPUT_COMPONENTS) or any(trained[n] for n in _BLOCK_WEIGHTS)
    flows = dict.fromkeys(_INPUT_COMPONENTS, False)
    flows.update(dict.fromkeys(_BLOCK_WEIGHTS + _WEIGHTLESS + ("output_head", "action_decoder"), into_blocks))
    out = {}
    for name in COMPONENTS:
        if name in _WEIGHTLESS:
            out[name] = 3.0 if flows[name] else 1.0
        else:
            out[name] = 3.0 if trained[name] else (2.0 if flows[name] else 1.0)
    return out


def step_kernel(cfg: ModelConfig, backend: str | None = None) -> str:
    """The attention kernel `cfg` runs on `backend` (default: the platform the program is built for)."""
    return resolve_attention(cfg.attention, backend or context_parallel.target_backend(), cfg.dtype)


def train_step_flops(spec: StageSpec, *, pad_to_multiple: int = 1, backend: str | None = None,
                     kernel: str | None = None) -> StepFlops:
    """Model and hardware FLOPs of one training step of a stage; the hardware count is of `kernel`, default the
    one model.attention resolves to on `backend` (default: the platform the program is built for)."""
    cfg = spec.model
    batch = spec.clip.batch_size
    shape = SequenceShape.of_stage(spec, pad_to_multiple=pad_to_multiple)
    kernel = step_kernel(cfg, backend) if kernel is None else kernel
    components = forward_flops(cfg, shape)
    hardware = forward_flops(cfg, shape, kernel=kernel)
    dense = forward_flops(cfg, shape, kernel="dot_product")
    tok = token_counts(cfg, shape)
    pairs = self_attention_pairs(cfg, shape, kernel=kernel)
    forward = components.pop("total")
    hardware.pop("total")
    dense.pop("total")
    multipliers = train_multipliers(spec.trainable)
    frozen_text_kv = 0.0
    if multipliers["cross_attention_projections"] == 2.0 and multipliers["text_projection"] == 1.0:
        # The text keys/values of a frozen cross-attention have no trained parameter upstream: forward only.
        frozen_text_kv = float(cfg.num_layers * 2 * _dense(tok.text, cfg.dim, cfg.dim)) * batch

    def train_flops(parts: dict[str, float]) -> float:
        return sum(multipliers[name] * value for name, value in parts.items()) * batch - frozen_text_kv

    # Remat re-runs the block stack's forward during the backward pass ("everything" saves it all).
    recompute = 0.0 if cfg.remat_policy in _NO_RECOMPUTE_POLICIES else block_forward_flops(hardware) * batch
    frozen = frozen_flops(spec, batch)
    return StepFlops(
        forward_per_sample=forward,
        train_per_step=train_flops(components),
        frozen_per_step=float(sum(frozen.values())),
        hardware_per_step=train_flops(hardware) + recompute,
        dense_per_step=train_flops(dense),
        batch_size=batch,
        video_tokens=tok.video,
        action_tokens=tok.action,
        proprio_tokens=tok.proprio,
        text_tokens=tok.text,
        image_tokens=tok.image,
        components=components,
        frozen_components=frozen,
        attention_kernel=kernel,
        hardware_components=hardware,
        attention=pairs,
    )
