"""Offline evaluation on held-out episodes: in the training loop (`eval.every_steps`) and as a CLI.

    python -m wamjax.eval.offline --checkpoint=WORKDIR/checkpoints[/STEP] --data_dir=DIR \
        [--modes=joint,imagine_then_act,world_model] [--num_batches=N] [--out=DIR]
    python -m wamjax.eval.offline --checkpoint=... --vision_ablation   # does it look? (wamjax.eval.action_error)

Per dataset and overall: a deterministic flow-matching loss (fixed noise, a fixed grid of t), and per mode
(wamjax.diffusion.modes) from fixed sampling noise: action MSE and L1 per dimension in normalized and dataset
units, gripper open/close accuracy (sign of the last action dimension in normalized units), and PSNR / SSIM
of the decoded predicted frames against the true ones. Rows go to metrics.jsonl as `"event": "eval"` lines
(the FLOP report skips event lines), scalars to TensorBoard, and frame grids (context | predicted, context |
true) to TensorBoard and WORKDIR/eval/*.png.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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
from data_pipelines.standardize.stats import unnormalize
from wamjax.checkpoint.load import load_checkpoint, load_model_run_config, load_norm_stats, resolve_step_dir
from wamjax.checkpoint.norm_stats import checked_norm_stats
from wamjax.checkpoint.wan_vae_import import load_vae
from wamjax.diffusion import flow
from wamjax.diffusion.modes import MODES, check_mode
from wamjax.diffusion.sampler import SamplerOptions, sample
from wamjax.eval.action_error import format_action_error, policy_action_error
from wamjax.inference.policy import Policy
from wamjax.inference.policy_step import imagine_then_act
from wamjax.models import vae as vae_lib
from wamjax.models.config import ModelConfig
from wamjax.models.text import TextEmbedder
from wamjax.models.wam import wam_forward
from wamjax.parallel.placement import device_batch
from wamjax.paths import PathLike, as_path
from wamjax.stages import StageSpec, policy_spec

Params = Any
T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)  # flow times of the deterministic eval loss
NOISE_SEED = 20_240_601  # fixed noise of the eval loss and of sampling: the same numbers at every eval


def eval_config() -> ml_collections.ConfigDict:
    """The `config.eval` block (offline evaluation in the training loop)."""
    c = ml_collections.ConfigDict()
    c.every_steps = 0  # evaluate on held-out clips every this many steps (and at a stage's end); 0 = off
    c.num_batches = 2  # batches per dataset per evaluation
    c.modes = "joint,imagine_then_act,world_model"  # ways to act evaluated in joint stages (video: "video")
    c.num_steps = 4  # sampler steps of the evaluation's predictions
    c.grid_examples = 1  # examples per evaluation drawn as frame grids
    # Closed-loop evaluation in a simulator (wamjax.eval.closed_loop) in stages with actions; 0 = off.
    c.closed_loop_every_steps = 0  # every this many steps (and at the stage's end)
    c.closed_loop_env = "metaworld"
    c.closed_loop_tasks = "reach-v3"  # comma-separated
    c.closed_loop_episodes = 1  # per task, on held-out variants (MT1 seed closed_loop_seed)
    c.closed_loop_seed = 1000
    c.closed_loop_max_steps = 150  # environment steps per episode
    c.closed_loop_resolution = (128, 128)  # rendered H, W (the policy resizes to data.resolution)
    c.closed_loop_camera = "corner"
    c.closed_loop_num_steps = 4  # sampler steps of the policy
    c.closed_loop_execute_actions = 0  # actions of each chunk run before replanning; 0 = the whole chunk
    c.closed_loop_dataset = "metaworld"  # whose normalization stats the policy acts with
    return c


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
    """Per-example, per-dimension squared/absolute errors [B, A] (masked mean over time) in normalized and
    dataset units, and gripper agreement [B] (sign of the last dimension)."""
    m = mask.astype(np.float32)[..., None]
    denom = np.maximum(m.sum(1), 1.0)
    out = {"action_mse": (np.square(pred - true) * m).sum(1) / denom,
           "action_l1": (np.abs(pred - true) * m).sum(1) / denom}
    if group_stats is not None:
        raw_p = unnormalize(pred, group_stats["action"], method)
        raw_t = unnormalize(true, group_stats["action"], method)
        out["action_mse_raw"] = (np.square(raw_p - raw_t) * m).sum(1) / denom
        out["action_l1_raw"] = (np.abs(raw_p - raw_t) * m).sum(1) / denom
    agree = ((pred[..., -1] > 0) == (true[..., -1] > 0)).astype(np.float32)
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
    """PNG files `out_dir/step_<step>_<name>.png` (local or an etils.epath URI); returns their paths."""
    from PIL import Image

    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, grid in sorted(grids.items()):
        path = out_dir / f"step_{step}_{name}.png"
        with path.open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")
        paths.append(str(path))
    return paths


class LoopEvaluator:
    """Offline evaluation from the training loop: every `eval.every_steps` steps and at a stage's end."""

    def __init__(self, config: ml_collections.ConfigDict, stage: StageSpec, text: Any, mesh: jax.sharding.Mesh,
                 rules: Any, vae_params: Params, norm_stats: dict[str, Any], writer: Any, workdir: str):
        ev = config.eval
        self.every = int(ev.every_steps)
        self.num_batches = int(ev.num_batches)
        if self.num_batches < 1:
            raise ValueError(f"eval.num_batches={self.num_batches}; expected >= 1")
        self.config, self.stage, self.data = config, stage.name, stage.data
        self.spec = EvalSpec(model=stage.model, vae=stage.vae, stage_mode=stage.mode,
                             clean_context_frames=stage.clean_context_frames, modes=parse_modes(ev.modes),
                             options=SamplerOptions(num_steps=int(ev.num_steps),
                                                    shift=float(stage.diffusion.shift)))
        self.text, self.mesh, self.rules = text, mesh, rules
        self.vae_params, self.norm_stats, self.writer, self.workdir = vae_params, norm_stats, writer, workdir

    @classmethod
    def maybe(cls, config: ml_collections.ConfigDict, stage: StageSpec, *args: Any) -> LoopEvaluator | None:
        """An evaluator when `eval.every_steps` > 0 (and the batches carry frames), else None."""
        ev = config.get("eval")
        if ev is None or int(ev.every_steps) <= 0:
            return None
        if stage.uses_latents_cache:
            logging.warning("eval.every_steps is set but data.latents_cache carries no frames; no offline eval")
            return None
        return cls(config, stage, *args)

    def maybe_run(self, step: int, params: Params, stage_ends: bool) -> dict[str, Any] | None:
        """Evaluates when `step` is due (or the stage ends); returns the row written, if any."""
        if not (step % self.every == 0 or stage_ends) or self.vae_params is None:
            return None
        batches = eval_batches(self.config, self.data, self.norm_stats, self.num_batches,
                               jax.process_index(), jax.process_count())
        row, grids = evaluate(self.spec, params, self.vae_params, batches,
                              lambda host: device_batch(host, self.text, self.mesh, self.rules),
                              self.norm_stats, str(self.data.action_normalization),
                              int(self.config.eval.grid_examples))
        row = {"event": "eval", "kind": "eval", "stage": self.stage, "step": int(step), **row}
        self.writer.write_eval(row, grids)
        if jax.process_index() == 0:
            write_grids(as_path(self.workdir) / "eval", step, grids)
        logging.info("eval at step %d: %s", step, format_table(row))
        return row


def format_table(row: dict[str, Any]) -> str:
    """The scalar metrics of an eval row as aligned lines "name  value"."""
    keys = [k for k, v in row.items() if "/" in k and isinstance(v, (int, float))]
    width = max((len(k) for k in keys), default=0)
    return "\n" + "\n".join(f"  {k:<{width}}  {row[k]:.5g}" for k in keys)


# --- CLI -------------------------------------------------------------------------------------------------------

def evaluate_checkpoint(path: str, *, data_dir: str = "", modes: str = ",".join(MODES), num_batches: int = 2,
                        batch_size: int = 0, num_steps: int = 4, use_ema: bool = True, out: str = "",
                        grid_examples: int = 1) -> dict[str, Any]:
    """Evaluates a checkpoint (step dir, or a run's checkpoints/) on its run's held-out clips; writes
    `out/offline_eval.json` and frame-grid PNGs (out default: the run's WORKDIR/eval). Returns the row."""
    import json

    step_path = resolve_step_dir(path)
    step_dir = str(step_path)
    run_config, params = load_checkpoint(step_dir, use_ema=use_ema)
    stats = checked_norm_stats(run_config, load_norm_stats(step_dir), where=f"checkpoint {step_dir}")
    cfg = policy_spec(run_config).model
    data = run_config.data
    with data.unlocked():
        if data_dir:
            data.data_dir = data_dir
        if batch_size:
            data.batch_size = batch_size
    joint = "actions" in params
    vae_config, vae_params = load_vae(run_config.vae.size, run_config.vae.weights, int(run_config.vae.seed))
    spec = EvalSpec(model=cfg, vae=vae_config, stage_mode="joint" if joint else "video", clean_context_frames=1,
                    modes=parse_modes(modes), options=SamplerOptions(num_steps=num_steps,
                                                                     shift=float(run_config.diffusion.shift)))
    text = TextEmbedder(run_config.text, cfg.text_dim)

    def to_device(host):
        batch = {k: jnp.asarray(v) for k, v in host.items() if v.dtype.kind not in "US"}
        batch["text_embeddings"] = jnp.asarray(text(host["instruction"]))
        return batch

    row, grids = evaluate(spec, jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, vae_params),
                          eval_batches(run_config, data, stats, num_batches), to_device, stats,
                          str(data.action_normalization), grid_examples)
    step = int(step_path.name)
    row = {"event": "eval", "kind": "eval", "checkpoint": step_dir, "step": step, **row}
    out_dir = as_path(out) if out else step_path.parent.parent / "eval"  # WORKDIR/checkpoints/STEP -> WORKDIR/eval
    write_grids(out_dir, step, grids)
    (out_dir / "offline_eval.json").write_text(json.dumps(row, indent=1, allow_nan=True))
    return row


def vision_ablation(path: str, *, data_dir: str = "", max_episodes: int = 8, windows_per_episode: int = 2,
                    num_steps: int = 4, use_ema: bool = True, out: str = "", print_fn: Any = print) -> list[dict]:
    """`wamjax.eval.action_error` for every dataset of a checkpoint's action stage: the first chunk's error with
    its cameras, a blank frame and another episode's frames, beside a constant mean action. Writes
    `out/vision_ablation.json` (out default: the run's WORKDIR/eval) and returns the rows."""
    import json

    step_path = resolve_step_dir(path)
    rows = []
    policy = None
    for name in data_config_lib.dataset_names(policy_spec(load_model_run_config(step_path)).data):
        policy = Policy.from_checkpoint(str(step_path), num_steps=num_steps, use_ema=use_ema, dataset=name)
        data = copy.deepcopy(policy.spec.data)
        with data.unlocked():
            if data_dir:
                data.data_dir = data_dir
        result = policy_action_error(policy, data, name, max_episodes=max_episodes,
                                     windows_per_episode=windows_per_episode)
        print_fn(format_action_error(result))
        rows.append(result)
    out_dir = as_path(out) if out else step_path.parent.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vision_ablation.json").write_text(json.dumps(
        {"checkpoint": str(step_path), "step": int(step_path.name), "datasets": rows}, indent=1))
    return rows


def main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if f.vision_ablation:
        vision_ablation(f.checkpoint, data_dir=f.data_dir, max_episodes=f.ablation_episodes,
                        windows_per_episode=f.ablation_windows, num_steps=f.num_steps, use_ema=f.use_ema, out=f.out)
        return
    row = evaluate_checkpoint(f.checkpoint, data_dir=f.data_dir, modes=f.modes, num_batches=f.num_batches,
                              batch_size=f.batch_size, num_steps=f.num_steps, use_ema=f.use_ema, out=f.out)
    print(f"offline eval of {row['checkpoint']} (step {row['step']}):{format_table(row)}")


def define_flags() -> None:
    """The CLI flags (defined only when run as a program)."""
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Checkpoint step directory, or a run's checkpoints/ (newest step).")
    flags.DEFINE_string("data_dir", "", "TFDS data dir of the run's datasets (default: the run's data.data_dir).")
    flags.DEFINE_string("modes", ",".join(MODES), "Ways to act to evaluate (joint checkpoints).")
    flags.DEFINE_integer("num_batches", 2, "Held-out batches per dataset.")
    flags.DEFINE_integer("batch_size", 0, "Examples per batch (0: the run's data.batch_size).")
    flags.DEFINE_integer("num_steps", 4, "Sampler steps of the predictions.")
    flags.DEFINE_bool("use_ema", True, "Evaluate the EMA params when the checkpoint has them.")
    flags.DEFINE_string("out", "", "Where offline_eval.json and the frame-grid PNGs go (default: WORKDIR/eval).")
    flags.DEFINE_bool("vision_ablation", False, "Instead: the policy's first-chunk action error on episodes with "
                      "its cameras, a blank frame and another episode's frames, beside a constant mean action "
                      "(wamjax.eval.action_error); writes vision_ablation.json.")
    flags.DEFINE_integer("ablation_episodes", 8, "Episodes per dataset of --vision_ablation (held-out ones when "
                         "the run holds some out).")
    flags.DEFINE_integer("ablation_windows", 2, "Windows per episode of --vision_ablation.")
    flags.mark_flag_as_required("checkpoint")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
