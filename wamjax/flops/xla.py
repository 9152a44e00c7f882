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

from wamjax.flops.analytic import token_counts
from wamjax.models.config import ModelConfig

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
    image_tokens: int = 0,
) -> dict[str, Any]:
    from wamjax.models.wam import example_inputs

    return jax.eval_shape(
        lambda: example_inputs(cfg, latent_shape, text_length, num_actions, True, batch, image_tokens or None)
    )


def compiled_forward_flops(
    cfg: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    text_length: int,
    num_actions: int,
    batch: int,
    pad_to_multiple: int = 1,
    image_tokens: int = 0,
) -> float:
    """XLA's FLOP count of one compiled `wam_forward` call exactly as `cfg` describes it (no unrolling); a
    teacher-forced model (`trains_teacher_forced`) is compiled with its clean history, as training runs it."""
    from wamjax.models.token_layout import trains_teacher_forced
    from wamjax.models.wam import init_params, wam_forward

    params = jax.eval_shape(
        lambda: init_params(cfg, jax.random.key(0), latent_shape, text_length, num_actions, with_proprio=True)
    )
    inputs = _abstract_inputs(cfg, latent_shape, text_length, num_actions, batch, image_tokens)
    history = {}
    if trains_teacher_forced(cfg):
        history = {"history_latents": inputs["latents"], "history_actions": inputs.get("actions")}
    fn = jax.jit(lambda p, **kw: wam_forward(cfg, p, pad_to_multiple=pad_to_multiple, **kw))
    return _cost_flops(fn.lower(params, **inputs, **history).compile())


def param_bytes(
    cfg: ModelConfig, latent_shape: tuple[int, int, int, int], text_length: int, num_actions: int
) -> int:
    """Bytes of the model's float32 parameters, counted abstractly."""
    from wamjax.models.wam import init_params

    params = jax.eval_shape(
        lambda: init_params(cfg, jax.random.key(0), latent_shape, text_length, num_actions, with_proprio=True)
    )
    return int(
        sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))
    )


def xla_forward_flops(
    model_cfg: ModelConfig,
    *,
    mode: str,
    num_frames: int,
    resolution: tuple[int, int] | list[int],
    text_length: int,
    batch: int = 1,
    pad_to_multiple: int = 1,
    max_param_bytes: int | None = DEFAULT_MAX_PARAM_BYTES,
    image_tokens: int = 0,
) -> float:
    """XLA's forward FLOPs for `batch` samples, same arguments as `analytic.forward_flops`.

    Raises ValueError when the model's parameters exceed `max_param_bytes` (None: no limit).
    """
    tok = token_counts(
        model_cfg,
        mode=mode,
        num_frames=num_frames,
        resolution=resolution,
        text_length=text_length,
        pad_to_multiple=pad_to_multiple,
    )
    latent_shape = (*tok.latent_shape, model_cfg.in_channels)
    if max_param_bytes is not None:
        size = param_bytes(model_cfg, latent_shape, text_length, tok.action)
        if size > max_param_bytes:
            raise ValueError(
                f"--xla refused: the model has {size / 2**30:.2f} GiB of float32 parameters, over the limit "
                f"of "
                f"{max_param_bytes / 2**30:.2f} GiB for compiling on this host; use a smaller model.size "
                "or raise the limit (--xla_max_param_bytes)"
            )

    def cost(layers: int) -> float:
        cfg = dataclasses.replace(model_cfg, num_layers=layers, scan_layers=False, remat_policy="none")
        return compiled_forward_flops(cfg, latent_shape, text_length, tok.action, batch, pad_to_multiple,
                                      image_tokens)

    one = cost(1)
    if model_cfg.num_layers == 1:
        return one
    two = cost(2)
    return one + (model_cfg.num_layers - 1) * (two - one)
