"""Metrics of a model on held-out clips: a deterministic flow-matching loss, action errors in normalized and
dataset units, gripper accuracy, PSNR / SSIM of decoded predictions, and frame grids; the batches they are
computed on."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from data_pipelines import config as data_config_lib
from data_pipelines import pipeline
from data_pipelines.clips.process_split import split_for_process
from data_pipelines.sources.synthetic import SyntheticClip
from data_pipelines.standardize import embodiments
from data_pipelines.standardize.stats import unnormalize
from wamjax.diffusion import flow
from wamjax.diffusion.modes import MODES, check_mode
from wamjax.diffusion.sampler import SamplerOptions, sample
from wamjax.inference.policy_step import imagine_then_act
from wamjax.models import vae as vae_lib
from wamjax.models.config import ModelConfig
from wamjax.models.wam import wam_forward
from wamjax.paths import PathLike, as_path

Params = Any
T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)  # flow times of the deterministic eval loss
NOISE_SEED = 20_240_601  # fixed noise of the eval loss and of sampling: the same numbers at every eval


def parse_modes(modes: str | tuple[str, ...]) -> tuple[str, ...]:
    """"joint,world_model" -> ("joint", "world_model"), each checked."""
    names = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    return tuple(check_mode(m, MODES, "eval.modes entry") for m in names if m)


# --- Metrics of frames ----------------------------------------------------------------------------------------

def psnr(pred: jax.Array, true: jax.Array, axes: tuple[int, ...] = (-4, -3, -2, -1)) -> jax.Array:
    """PSNR in dB of images in [-1, 1] over `axes` (inf for identical images)."""
    mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - true.astype(jnp.float32)), axis=axes)
    return 10.0 * jnp.log10(4.0 / mse)  # peak-to-peak 2


def ssim(pred: jax.Array, true: jax.Array) -> jax.Array:
    """Mean SSIM of frames [..., H, W, 3] in [-1, 1] (11x11 Gaussian window, sigma 1.5, per channel), per
    leading index [...]; 1 for identical frames."""
    x = (pred.astype(jnp.float32) + 1.0) / 2.0
    y = (true.astype(jnp.float32) + 1.0) / 2.0
    lead = x.shape[:-3]
    h, w, c = x.shape[-3:]
    size = min(11, h, w)
    g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / 1.5) ** 2)
    g = (g / g.sum()).astype(np.float32)

    def blur(z):  # separable Gaussian filter, valid padding, per channel
        z = z.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(-1, 1, h, w)
        kh, kw = jnp.asarray(g).reshape(1, 1, size, 1), jnp.asarray(g).reshape(1, 1, 1, size)
        z = jax.lax.conv_general_dilated(z, kh, (1, 1), "VALID")
        return jax.lax.conv_general_dilated(z, kw, (1, 1), "VALID")

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.reshape(*lead, -1).mean(-1)


# --- The jitted evaluation of one batch -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """Static facts one compiled evaluation depends on."""

    model: ModelConfig
    vae: Any
    stage_mode: str  # "video" | "joint"
    clean_context_frames: int
    modes: tuple[str, ...]
    options: SamplerOptions


def _eval_batch(spec: EvalSpec, params: Params, vae_params: Params, batch: dict[str, jax.Array]):
    """Per-example metrics of one batch, and the decoded predicted clips [B, T, H, W, 3] in [-1, 1] per mode."""
    cfg = spec.model
    video = vae_lib.frames_to_video(batch["frames"])
    x0 = vae_lib.normalize_latents(spec.vae, vae_lib.vae_encode(spec.vae, vae_params, video))
    b, f = x0.shape[:2]
    nc = max(1, spec.clean_context_frames)
    text = batch["text_embeddings"]
    joint = spec.stage_mode == "joint"
    actions = batch["actions"] if joint else None
    proprio = batch["proprio"] if joint else None
    key = jax.random.key(NOISE_SEED)
    noise = jax.random.normal(jax.random.fold_in(key, 0), x0.shape)
    action_noise = None if actions is None else jax.random.normal(jax.random.fold_in(key, 1), actions.shape)
    context = jnp.arange(f) < spec.clean_context_frames
    out: dict[str, jax.Array] = {}

    # Deterministic flow-matching loss: the same noise at each t of a fixed grid, both modalities at t.
    losses_v, losses_a = [], []
    for t in T_GRID:
        t_video = jnp.where(context[None], 0.0, jnp.full((b, f), t))
        t_action = None if actions is None else jnp.full(actions.shape[:2], t)
        pred = wam_forward(cfg, params, flow.add_noise(x0, noise, t_video), flow.to_model_timestep(t_video), text,
                           actions=None if actions is None else flow.add_noise(actions, action_noise, t_action),
                           t_action=None if t_action is None else flow.to_model_timestep(t_action), proprio=proprio)
        err = jnp.mean(jnp.square(pred.video - flow.velocity_target(x0, noise)), axis=(2, 3, 4))
        losses_v.append(jnp.sum(err * ~context, 1) / jnp.maximum((~context).sum(), 1))
        if actions is not None:
            mask = batch["action_mask"].astype(jnp.float32)
            err_a = jnp.mean(jnp.square(pred.actions - flow.velocity_target(actions, action_noise)), axis=-1)
            losses_a.append(jnp.sum(err_a * mask, 1) / jnp.maximum(mask.sum(1), 1.0))
    out["flow_loss_video"] = jnp.mean(jnp.stack(losses_v), 0)
    if losses_a:
        out["flow_loss_action"] = jnp.mean(jnp.stack(losses_a), 0)

    # Predictions from fixed noise, per way to act.
    ctx, future = x0[:, :nc], noise[:, nc:]
    predictions: dict[str, tuple[jax.Array | None, jax.Array | None]] = {}
    for mode in spec.modes if joint else ("video",):
        if mode == "joint":
            s = sample(cfg, params, ctx, text, proprio, future, action_noise, options=spec.options)
        elif mode == "imagine_then_act":
            s = imagine_then_act(cfg, params, ctx, text, proprio, future, action_noise, spec.options)
        elif mode == "world_model":
            s = sample(cfg, params, ctx, text, proprio, future, None, options=spec.options, clean_actions=actions)
            s = s._replace(actions=None)
        else:  # "video": a video-only stage
            s = sample(cfg, params, ctx, text, None, future, None, options=spec.options)
        predictions[mode] = s.latents, s.actions
    frames = {}
    first = 1 + (nc - 1) * spec.vae.temporal_compression  # pixel frames the context latents cover
    for mode, (latents, pred_actions) in predictions.items():
        decoded = vae_lib.vae_decode(spec.vae, vae_params, vae_lib.denormalize_latents(spec.vae, latents))
        frames[mode] = decoded
        out[f"{mode}/psnr"] = psnr(decoded[:, first:], video[:, first:])
        out[f"{mode}/ssim"] = ssim(decoded[:, first:], video[:, first:]).mean(-1)
        if pred_actions is not None:
            out[f"{mode}/actions"] = pred_actions
    return out, frames


# --- Host side: datasets, aggregation, writing ----------------------------------------------------------------

def eval_batches(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict, stats: dict[str, Any],
                 num_batches: int, process_index: int = 0, process_count: int = 1,
                 ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(dataset name, per-process batch) for `num_batches` held-out batches per dataset, in a fixed order."""
    per_process = data.batch_size // process_count
    if data.source == "synthetic":

        clip = SyntheticClip(data.num_frames, tuple(data.resolution), data.proprio_dim, data.seed,
                             proprio_chunk_frames=int(data.get("proprio_chunk_frames", 0)))
        # Training reads clips 0 .. synthetic_examples - 1; the clips after them are never trained on.
        start = int(data.synthetic_examples)
        sources = [("synthetic", grain.MapDataset.range(start, start + num_batches * data.batch_size).map(clip))]
    else:

        names = data_config_lib.dataset_names(data)
        if not float(data.get("eval_fraction", 0.0)):
            raise ValueError("data.eval_fraction is 0: no episodes are held out to evaluate on; set it, e.g. "
                             "--config.data.eval_fraction=0.05, before training")
        sources = [(name, pipeline.clip_source(data, name, i, stats, evaluation=True)) for i, name in enumerate(names)]
        for name, source in sources:
            if len(source) == 0:
                logging.warning("eval: dataset %s has no held-out episodes at data.eval_fraction=%s; skipped",
                                name, data.eval_fraction)
        sources = [(name, source.repeat()) for name, source in sources if len(source)]
        if not sources:
            raise ValueError(f"data.eval_fraction={data.eval_fraction} holds out no episode of {names}; raise it")
    for name, source in sources:
        shard = split_for_process(source, process_index, process_count, per_process)
        it = iter(shard.to_iter_dataset().batch(per_process, drop_remainder=True))
        for _ in range(num_batches):
            yield name, next(it)


def _dataset_stats(stats: dict[str, Any], name: str) -> dict[str, Any] | None:
    return (stats or {}).get("datasets", {}).get(name)


def action_metrics(pred: np.ndarray, true: np.ndarray, mask: np.ndarray, group_stats: dict[str, Any] | None,
                   method: str) -> dict[str, np.ndarray]:
    """Per-example, per-dimension squared/absolute errors [B, A] (masked mean over time; the dataset's own
    dimensions of its embodiment) in normalized and dataset units, and gripper agreement [B] (sign of the
    embodiment's last gripper dimension)."""
    gripper = pred.shape[-1] - 1
    if group_stats is not None:  # the dataset's own dimensions of the padded model actions
        layout = embodiments.get_embodiment(group_stats.get("embodiment", "eef7"))
        own = len(group_stats["action"]["mask"])
        pred, true = pred[..., :own], true[..., :own]
        gripper = layout.gripper_dims[-1] if layout.gripper_dims else None
    m = mask.astype(np.float32)[..., None]
    denom = np.maximum(m.sum(1), 1.0)
    out = {"action_mse": (np.square(pred - true) * m).sum(1) / denom,
           "action_l1": (np.abs(pred - true) * m).sum(1) / denom}
    if group_stats is not None:
        raw_p = unnormalize(pred, group_stats["action"], method)
        raw_t = unnormalize(true, group_stats["action"], method)
        out["action_mse_raw"] = (np.square(raw_p - raw_t) * m).sum(1) / denom
        out["action_l1_raw"] = (np.abs(raw_p - raw_t) * m).sum(1) / denom
    if gripper is not None:
        agree = ((pred[..., gripper] > 0) == (true[..., gripper] > 0)).astype(np.float32)
        out["gripper_accuracy"] = (agree * m[..., 0]).sum(1) / denom[:, 0]
    return out


def summarize(per_dataset: dict[str, dict[str, list[np.ndarray]]]) -> dict[str, Any]:
    """Flat row: "<dataset or overall>/<metric>" -> mean (per-dimension metrics also as a list)."""
    row: dict[str, Any] = {}
    merged: dict[str, list[np.ndarray]] = {}
    for metrics in per_dataset.values():
        for key, parts in metrics.items():
            merged.setdefault(key, []).extend(parts)
    for name, metrics in [*per_dataset.items(), ("overall", merged)]:
        for key, parts in sorted(metrics.items()):
            values = np.concatenate(parts, 0).astype(np.float64)
            row[f"{name}/{key}"] = float(np.mean(values))
            if values.ndim == 2:
                row[f"{name}/{key}_per_dim"] = [float(v) for v in values.mean(0)]
        row[f"{name}/num_examples"] = int(sum(len(p) for p in metrics.get("flow_loss_video", [])))
    return row


def frame_grid(context: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """uint8 [2H, (1 + T)W, 3]: row 1 the context frame then the predicted frames, row 2 it then the true."""
    to_u8 = vae_lib.video_to_frames
    rows = [np.concatenate([to_u8(context), *map(to_u8, frames)], axis=1) for frames in (predicted, true)]
    return np.concatenate(rows, axis=0)


def evaluate(
    spec: EvalSpec, params: Params, vae_params: Params, batches, to_device, stats: dict[str, Any],
    normalization: str, grid_examples: int = 1,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Runs the held-out batches: (summary row, {"<dataset>_<mode>": frame grid}).

    `batches` yields (dataset, host batch); `to_device(host batch)` gives the model's batch (with
    text_embeddings).
    """
    per_dataset: dict[str, dict[str, list[np.ndarray]]] = {}
    grids: dict[str, np.ndarray] = {}
    run = _jitted_eval()
    for name, host in batches:
        metrics, frames = jax.device_get(run(spec, params, vae_params, to_device(host)))
        acc = per_dataset.setdefault(name, {})
        for key, value in metrics.items():
            if key.endswith("/actions"):
                mode = key.split("/")[0]
                for k, v in action_metrics(np.asarray(value), host["actions"], host["action_mask"],
                                           _dataset_stats(stats, name), normalization).items():
                    acc.setdefault(f"{mode}/{k}", []).append(v)
            else:
                acc.setdefault(key, []).append(np.asarray(value))
        for mode, decoded in frames.items():
            for i in range(min(grid_examples, len(decoded))):
                key = f"{name}_{mode}_{i}"
                if key not in grids:
                    first = 1 + (max(1, spec.clean_context_frames) - 1) * spec.vae.temporal_compression
                    video = np.asarray(host["frames"][i], np.float32) / 127.5 - 1.0
                    grids[key] = frame_grid(video[first - 1], decoded[i][first:], video[first:])
    return summarize(per_dataset), grids


@functools.cache
def _jitted_eval():
    return jax.jit(_eval_batch, static_argnums=0)


def write_grids(out_dir: PathLike, step: int, grids: dict[str, np.ndarray]) -> list[str]:
    """PNG files `out_dir/step_<step>_<name>.png` (local or an etils.epath URI; characters of a dataset name
    such as `lerobot:/data/x` that do not belong in a file name become `_`); returns their paths."""
    from PIL import Image

    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, grid in sorted(grids.items()):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
        path = out_dir / f"step_{step}_{safe}.png"
        with path.open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")
        paths.append(str(path))
    return paths
