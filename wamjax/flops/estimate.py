"""Prints the FLOPs of a config: per sample, per step, in total, and the steps a budget buys.

  python -m wamjax.flops.estimate --config=configs/wam.py:size=wan14b,stage=action_tune \
      [--config.data.batch_size=128] [--steps=N | --samples=N] [--budget_flops=9e21] [--format=json] [--xla] \
      [--backend=tpu]

Three counts of a run, labelled: 6*N*D (the published convention), model FLOPs (self-attention over the pairs the
mask lets a query see: what budgets, the ledger and MFU use) and hardware FLOPs (what model.attention, resolved
for --backend, computes at its block sizes, plus remat recompute). The dense count (every pair, the ledger's
unit before masks were read) is printed beside them.

Totals use --steps, else --samples, else the stage's `steps` (or train.steps). The budget is --budget_flops,
else the stage's `budget_flops`. `stage_steps` is the count a run of the stage takes: its `steps`, cut to what
the budget buys (`budget_limited`), the same count the training loop stops on and builds its schedule for.
`--xla` adds XLA's count of the compiled forward (small sizes only).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from wamjax.flops import analytic, ledger
from wamjax.flops import xla as xla_lib
from wamjax.flops.ledger import format_flops
from wamjax.flops.stage import step_kernel, train_step_flops
from wamjax.models.config import ModelConfig
from wamjax.models.wam import init_params
from wamjax.stages import stage_spec


def resolve_stage(config: ml_collections.ConfigDict, stage: str) -> str:
    """The stage to estimate: `stage`, else the config's own; 'all' has to be narrowed to one stage."""
    name = stage or str(config.stage)
    if name not in config.stages:
        raise ValueError(
            f"stage {name!r} is not one stage of config.stages {sorted(config.stages.keys())}; "
            "pass --stage=NAME"
        )
    return name


def estimate(
    config: ml_collections.ConfigDict,
    stage: str,
    *,
    steps: int | None = None,
    samples: int | None = None,
    budget_flops: float | None = None,
    xla: bool = False,
    xla_max_param_bytes: int | None = None,
    pad_to_multiple: int = 1,
    backend: str = "tpu",
) -> dict[str, Any]:
    """The estimate as one JSON-ready dict (what `--format=json` prints); hardware FLOPs are of the kernel
    model.attention runs on `backend`."""
    spec = stage_spec(config, stage)
    step_flops = train_step_flops(spec, pad_to_multiple=pad_to_multiple, backend=backend)
    batch = step_flops.batch_size
    if steps is not None and samples is not None:
        raise ValueError("give --steps or --samples, not both")
    configured_steps = spec.steps
    if samples is not None:
        steps = math.ceil(samples / batch)
    elif steps is None:
        steps = configured_steps
    samples = steps * batch if samples is None else samples
    budget = spec.budget_flops if budget_flops is None else float(budget_flops)
    total = step_flops.train_per_sample * samples
    per_step_to_total = samples / batch
    pairs = step_flops.attention
    model_cfg = spec.model
    shape = analytic.SequenceShape.of_stage(spec, pad_to_multiple=pad_to_multiple)
    tok = analytic.token_counts(model_cfg, shape)
    out: dict[str, Any] = {
        "size": config.get("size", ""),
        "stage": stage,
        "mode": spec.mode,
        "num_frames": spec.clip.num_frames,
        "resolution": list(spec.clip.resolution),
        "batch_size": batch,
        "latent_shape": list(tok.latent_shape),
        "video_tokens": step_flops.video_tokens,
        "action_tokens": step_flops.action_tokens,
        "proprio_tokens": step_flops.proprio_tokens,
        "text_tokens": step_flops.text_tokens,
        "sequence_length": tok.sequence,
        "components": step_flops.components,
        "forward_flops_per_sample": step_flops.forward_per_sample,
        "train_flops_per_sample": step_flops.train_per_sample,
        "train_flops_per_step": step_flops.train_per_step,
        "hardware_flops_per_step": step_flops.hardware_per_step,
        "dense_flops_per_step": step_flops.dense_per_step,
        "hardware_forward_flops_per_sample": step_flops.hardware_forward_per_sample,
        "remat_policy": model_cfg.remat_policy,
        "backend": backend,
        "attention": {
            "kernel": pairs.kernel, "block_q": pairs.block_q, "block_kv": pairs.block_kv,
            "visible_pairs": pairs.visible, "computed_pairs": pairs.computed, "dense_pairs": pairs.dense,
            "visible_fraction": pairs.visible_fraction, "computed_fraction": pairs.computed / pairs.dense,
            "block_pairs": pairs.block_pairs, "skipped_block_pairs": pairs.skipped_block_pairs,
        },
        "frozen_components_per_step": step_flops.frozen_components,
        "frozen_flops_per_step": step_flops.frozen_per_step,
        "steps": steps,
        "samples": samples,
        "configured_steps": configured_steps,
        "total_train_flops": total,
        "total_hardware_flops": step_flops.hardware_per_step * per_step_to_total,
        "total_dense_flops": step_flops.dense_per_step * per_step_to_total,
        "total_frozen_flops": step_flops.frozen_per_step * samples / batch,
        "budget_flops": budget,
        "steps_for_budget": ledger.steps_for_budget(budget, step_flops.train_per_step)
        if budget > 0
        else None,
        "budget_fraction_of_total": total / budget if budget > 0 else None,
        # What a run of this stage does: its configured steps, cut to what the budget buys.
        "stage_steps": ledger.stage_step_count(configured_steps, budget, step_flops.train_per_step),
        "budget_limited": budget > 0
        and ledger.stage_step_count(configured_steps, budget, step_flops.train_per_step) < configured_steps,
    }
    out.update(six_nd(model_cfg, tok, steps, batch))
    if xla:

        limit = xla_lib.DEFAULT_MAX_PARAM_BYTES if xla_max_param_bytes is None else xla_max_param_bytes
        # XLA compiles the forward for this host: compare what this host's kernel computes.
        host_kernel = step_kernel(model_cfg, "cpu")
        host_forward = train_step_flops(spec, pad_to_multiple=pad_to_multiple,
                                                 kernel=host_kernel).hardware_forward_per_sample
        xla_flops = xla_lib.xla_forward_flops(model_cfg, shape, batch=1, max_param_bytes=limit)
        out["xla_forward_flops_per_sample"] = xla_flops
        out["xla_kernel"] = host_kernel
        out["analytic_over_xla"] = host_forward / xla_flops
    return out


SIX_ND_LABEL = (
    "6*N*D (the NVIDIA blog's convention): 6 x params x steps x batch x (video + action + proprio tokens); "
    "attention scores, modulation, text tokens and frozen encoders left out"
)
FULL_COUNT_LABEL = (
    "model FLOPs: 3 x analytic forward per sample, self-attention over the (query, key) pairs the mask lets a "
    "query see (MaxText's convention), modulation, heads, cross-attention; no remat; frozen VAE encoding apart"
)
HARDWARE_LABEL = (
    "hardware FLOPs: what the kernel computes (every pair for dense kernels, the block pairs it does not skip for "
    "blockwise/splash, partly masked blocks whole) plus remat recompute"
)
DENSE_LABEL = "dense: every (query, key) pair counted, masked or not (the ledger's unit before masks were read)"


def param_count(model_cfg: ModelConfig, tok: analytic.TokenCounts) -> int:
    """Parameters of the model a stage trains (backbone plus action modules in joint mode), counted abstractly."""
    import jax

    f, h, w = tok.latent_shape
    latent_shape = (f, h, w, model_cfg.in_channels)
    shapes = jax.eval_shape(
        lambda: init_params(model_cfg, jax.random.key(0), latent_shape, tok.text, tok.action, tok.proprio > 0)
    )
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def six_nd(model_cfg: ModelConfig, tok: analytic.TokenCounts, steps: int, batch: int) -> dict[str, Any]:
    """The 6*N*D figure of a run (what published totals such as DreamZero's ~9 ZFLOPs use), labelled."""
    params = param_count(model_cfg, tok)
    tokens = tok.video + tok.action + tok.proprio
    return {
        "six_nd_params": params,
        "six_nd_tokens_per_sample": tokens,
        "six_nd_total_flops": 6.0 * params * steps * batch * tokens,
        "six_nd_label": SIX_ND_LABEL,
        "total_train_flops_label": FULL_COUNT_LABEL,
        "total_hardware_flops_label": HARDWARE_LABEL,
        "total_dense_flops_label": DENSE_LABEL,
    }


def format_text(est: dict[str, Any]) -> str:
    """The human-readable report of an estimate."""
    lines = [
        f"{est['size']} / {est['stage']} (mode {est['mode']}): {est['num_frames']} frames at "
        f"{est['resolution'][0]}x{est['resolution'][1]}, latents {tuple(est['latent_shape'])}, "
        f"batch {est['batch_size']}",
        f"tokens per sample: video {est['video_tokens']}, action {est['action_tokens']}, "
        f"proprio {est['proprio_tokens']}, text {est['text_tokens']} "
        f"(self-attention length {est['sequence_length']})",
        "forward model FLOPs per sample by component:",
    ]
    fwd = est["forward_flops_per_sample"]
    for name, value in sorted(est["components"].items(), key=lambda kv: -kv[1]):
        if value:
            lines.append(f"  {name:<30} {format_flops(value):>14}  {100 * value / fwd:5.1f}%")
    att = est["attention"]
    blocks = (f" at blocks {att['block_q']}x{att['block_kv']}: {att['skipped_block_pairs']} of {att['block_pairs']} "
              "block pairs skipped" if att["block_pairs"] else " (dense kernel: every pair)")
    lines += [
        f"self-attention pairs: {att['visible_fraction']:.4f} of {att['dense_pairs']:,} visible (model); "
        f"{att['kernel']} (backend {est['backend']}) computes {att['computed_fraction']:.4f}{blocks}",
        f"forward per sample            {format_flops(fwd)} model, "
        f"{format_flops(est['hardware_forward_flops_per_sample'])} as {att['kernel']} computes it",
        f"train per sample              {format_flops(est['train_flops_per_sample'])}",
        f"train per step                {format_flops(est['train_flops_per_step'])} model, "
        f"{format_flops(est['dense_flops_per_step'])} dense",
        f"hardware per step ({att['kernel']}, remat={est['remat_policy']}) "
        f"{format_flops(est['hardware_flops_per_step'])}",
        f"frozen per step               {format_flops(est['frozen_flops_per_step'])} "
        + ", ".join(f"{k} {format_flops(v)}" for k, v in est["frozen_components_per_step"].items()),
        f"total for {est['steps']} steps ({est['samples']} samples): "
        f"{format_flops(est['total_train_flops'])} "
        f"model + {format_flops(est['total_frozen_flops'])} frozen",
        f"  [{est['total_train_flops_label']}]",
        f"hardware for {est['steps']} steps: {format_flops(est['total_hardware_flops'])}",
        f"  [{est['total_hardware_flops_label']}]",
        f"dense for {est['steps']} steps: {format_flops(est['total_dense_flops'])}",
        f"  [{est['total_dense_flops_label']}]",
        f"6*N*D for {est['steps']} steps: {format_flops(est['six_nd_total_flops'])} "
        f"(N = {est['six_nd_params'] / 1e9:.2f}B params, D = {est['six_nd_tokens_per_sample']} tokens per sample)",
        f"  [{est['six_nd_label']}]",
    ]
    if est["budget_flops"] > 0:
        lines.append(
            f"budget {format_flops(est['budget_flops'])} buys {est['steps_for_budget']} steps "
            f"({est['steps_for_budget'] * est['batch_size']} samples); the total above is "
            f"{est['budget_fraction_of_total']:.3f} of it"
        )
    if est["budget_limited"]:
        lines.append(
            f"the stage runs {est['stage_steps']} of its {est['configured_steps']} configured steps (budget-limited); "
            "its learning-rate schedule is built for that count"
        )
    if "xla_forward_flops_per_sample" in est:
        lines.append(
            f"XLA forward per sample        {format_flops(est['xla_forward_flops_per_sample'])} "
            f"(hardware analytic of {est['xla_kernel']} / XLA = {est['analytic_over_xla']:.4f})"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/wam.py:size=tiny,stage=action_tune")
    try:
        stage = resolve_stage(config, flags.FLAGS.stage)
        est = estimate(
            config,
            stage,
            steps=flags.FLAGS.steps,
            samples=flags.FLAGS.samples,
            budget_flops=flags.FLAGS.budget_flops,
            xla=flags.FLAGS.xla,
            xla_max_param_bytes=flags.FLAGS.xla_max_param_bytes,
            pad_to_multiple=flags.FLAGS.pad_to_multiple,
            backend=flags.FLAGS.backend,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if flags.FLAGS.format == "json":
        print(json.dumps(est, indent=2))
    else:
        print(format_text(est))


def define_flags() -> None:
    """Defines the CLI's flags (only when run as a program, so importing `estimate` defines none)."""
    config_flags.DEFINE_config_file("config", None, "Run config file, e.g. configs/wam.py:size=tiny.")
    flags.DEFINE_string("stage", "", "Stage to estimate; default: the config's stage (not 'all').")
    flags.DEFINE_integer("steps", None, "Number of steps for the total.")
    flags.DEFINE_integer("samples", None, "Number of samples for the total (instead of --steps).")
    flags.DEFINE_float("budget_flops", None, "FLOP budget; default: stages.<stage>.budget_flops.")
    flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
    flags.DEFINE_bool("xla", False, "Also compile the forward and report XLA's FLOP count.")
    flags.DEFINE_integer(
        "xla_max_param_bytes", None, "Largest model (bytes of float32 params) --xla compiles; default 1 GiB."
    )
    flags.DEFINE_integer("pad_to_multiple", 1, "Sequence padding multiple (the mesh's sequence axis size).")
    flags.DEFINE_enum("backend", "tpu", ["tpu", "gpu", "cpu"],
                      "Platform model.attention is resolved for (auto: splash on TPU, cudnn on GPU), for the "
                      "hardware count.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
