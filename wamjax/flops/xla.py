"""XLA's own FLOP count of the compiled forward pass: the cross-check of `wamjax.flops.analytic`.

XLA's cost analysis counts a while loop's body once, whatever its trip count, so a scanned block stack would
be undercounted. The forward is therefore compiled with the blocks unrolled, at one and at two layers; every
block costs the same, so the full model costs `one + (num_layers - 1) * (two - one)`. Inputs and parameters
are abstract (ShapeDtypeStructs): nothing of the model's size is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from wamjax.flops.analytic import SequenceShape, token_counts
from wamjax.models.config import ModelConfig
from wamjax.models.token_layout import trains_teacher_forced
from wamjax.models.wam import example_inputs, init_params, wam_forward

# Sizes above this many bytes of float32 parameters are refused: compiling them on a host CPU takes long.
DEFAULT_MAX_PARAM_BYTES = 1 << 30


def _cost_flops(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
        analysis = analysis[0]
    if not analysis or "flops" not in analysis:
        raise RuntimeError(f"XLA cost analysis has no 'flops' entry (got keys {sorted(analysis or {})})")
    return float(analysis["flops"])


def _abstract_inputs(
    cfg: ModelConfig, latent_shape: tuple[int, ...], text_length: int, num_actions: int, batch: int,
    image_tokens: int = 0, num_proprio: int = 1,
) -> dict[str, Any]:
    inputs = dict(jax.eval_shape(
        lambda: example_inputs(cfg, latent_shape, text_length, num_actions, True, batch, image_tokens or None)
    ))
    if num_proprio > 1 and num_actions:  # one state per chunk: proprio [B, C, P]
        inputs["proprio"] = jax.ShapeDtypeStruct((batch, num_proprio, cfg.proprio_dim), jnp.float32)
    return inputs


def compiled_forward_flops(
    cfg: ModelConfig,
    latent_shape: tuple[int, ...],
    text_length: int,
    num_actions: int,
    batch: int,
    pad_to_multiple: int = 1,
    image_tokens: int = 0,
    *,
    num_proprio: int = 1,
    teacher_forcing: bool | None = None,
) -> float:
    """XLA's FLOP count of one compiled `wam_forward` call exactly as `cfg` describes it (no unrolling), on
    latents [B, F, (V,) H, W, C]; with `teacher_forcing` (default: what training runs, `trains_teacher_forced`)
    it is compiled with its clean history, as training runs it."""
    params = jax.eval_shape(
        lambda: init_params(cfg, jax.random.key(0), latent_shape, text_length, num_actions, with_proprio=True)
    )
    inputs = _abstract_inputs(cfg, latent_shape, text_length, num_actions, batch, image_tokens, num_proprio)
    history = {}
    if trains_teacher_forced(cfg) if teacher_forcing is None else teacher_forcing:
        history = {"history_latents": inputs["latents"], "history_actions": inputs.get("actions")}
    fn = jax.jit(lambda p, **kw: wam_forward(cfg, p, pad_to_multiple=pad_to_multiple, **kw))
    return _cost_flops(fn.lower(params, **inputs, **history).compile())


def param_bytes(
    cfg: ModelConfig, latent_shape: tuple[int, ...], text_length: int, num_actions: int
) -> int:
    """Bytes of the model's float32 parameters, counted abstractly."""
    params = jax.eval_shape(
        lambda: init_params(cfg, jax.random.key(0), latent_shape, text_length, num_actions, with_proprio=True)
    )
    return int(
        sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))
    )


def xla_forward_flops(
    model_cfg: ModelConfig,
    shape: SequenceShape,
    *,
    batch: int = 1,
    max_param_bytes: int | None = DEFAULT_MAX_PARAM_BYTES,
) -> float:
    """XLA's forward FLOPs for `batch` samples of `shape`: what `analytic.forward_flops` counts (actions, proprio
    tokens, camera views, the teacher-forced history, image tokens, padding).

    Raises ValueError when the model's parameters exceed `max_param_bytes` (None: no limit).
    """
    tok = token_counts(model_cfg, shape)
    f, h, w = tok.latent_shape
    views = () if shape.views == 1 else (int(shape.views),)
    latent_shape = (f, *views, h, w, model_cfg.in_channels)
    if max_param_bytes is not None:
        size = param_bytes(model_cfg, latent_shape, shape.text_length, tok.action)
        if size > max_param_bytes:
            raise ValueError(
                f"--xla refused: the model has {size / 2**30:.2f} GiB of float32 parameters, over the limit "
                f"of "
                f"{max_param_bytes / 2**30:.2f} GiB for compiling on this host; use a smaller model.size "
                "or raise the limit (--xla_max_param_bytes)"
            )

    def cost(layers: int) -> float:
        cfg = dataclasses.replace(model_cfg, num_layers=layers, scan_layers=False, remat_policy="none")
        return compiled_forward_flops(cfg, latent_shape, shape.text_length, tok.action, batch, shape.pad_to_multiple,
                                      shape.image_tokens, num_proprio=max(tok.proprio, 1),
                                      teacher_forcing=tok.teacher_forcing)

    one = cost(1)
    if model_cfg.num_layers == 1:
        return one
    two = cost(2)
    return one + (model_cfg.num_layers - 1) * (two - one)
