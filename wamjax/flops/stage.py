"""FLOPs of one training step of a stage: model and hardware counts of the forward, backward and remat
recompute for the parameters the stage trains, and the frozen parts the step runs."""

from __future__ import annotations

import dataclasses

from wamjax.flops import attention_pairs
from wamjax.flops.analytic import (
    COMPONENTS,
    SequenceShape,
    block_forward_flops,
    dense_flops,
    forward_flops,
    self_attention_pairs,
    token_counts,
)
from wamjax.flops.encoders import vae_encode_flops
from wamjax.models import clip
from wamjax.models.attention import resolve_attention
from wamjax.models.config import ModelConfig
from wamjax.parallel import context as context_parallel
from wamjax.stages import StageSpec, is_trainable


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
    "lora_adapters": "blocks/layers/block/attn1/to_q/lora_a",
}
_INPUT_COMPONENTS = ("patch_embedding", "text_projection", "modulation", "action_encoders")
_BLOCK_WEIGHTS = ("self_attention_projections", "cross_attention_projections", "ffn", "lora_adapters")
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
        frozen_text_kv = float(cfg.num_layers * 2 * dense_flops(tok.text, cfg.dim, cfg.dim)) * batch

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
