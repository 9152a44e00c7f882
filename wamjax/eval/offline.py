"""Offline evaluation on held-out episodes: in the training loop (`eval.every_steps`) and as a CLI.

    python -m wamjax.eval.offline --checkpoint=WORKDIR/checkpoints[/STEP] --data_dir=DIR \
        [--modes=joint,imagine_then_act,world_model] [--num_batches=N] [--out=DIR]
    python -m wamjax.eval.offline --checkpoint=... --vision_ablation   # does it look? (wamjax.eval.action_error)

Per dataset and overall: a deterministic flow-matching loss (fixed noise, a fixed grid of t), and per mode
(wamjax.diffusion.modes) from fixed sampling noise: action MSE and L1 per dimension in normalized and dataset
units, gripper open/close accuracy (sign of the last action dimension in normalized units), and PSNR / SSIM
of the decoded predicted frames against the true ones. Rows go to metrics.jsonl as `"event": "eval"` lines
(the FLOP report skips event lines), scalars to TensorBoard, and frame grids (context | predicted, context |
true) to TensorBoard and WORKDIR/eval/*.png. The metrics themselves are `wamjax.eval.clip_metrics`.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from data_pipelines import config as data_config_lib
from wamjax.checkpoint.load import load_checkpoint, load_model_run_config, load_norm_stats, resolve_step_dir
from wamjax.checkpoint.norm_stats import checked_norm_stats
from wamjax.checkpoint.wan_vae_import import load_vae
from wamjax.diffusion.modes import MODES
from wamjax.diffusion.sampler import SamplerOptions
from wamjax.eval.action_error import format_action_error, policy_action_error
from wamjax.eval.clip_metrics import (
    EvalSpec,
    eval_batches,
    evaluate,
    parse_modes,
    write_grids,
)
from wamjax.inference.policy import Policy
from wamjax.models.text import TextEmbedder
from wamjax.parallel.placement import device_batch
from wamjax.paths import as_path
from wamjax.stages import StageSpec, policy_spec

Params = Any


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
