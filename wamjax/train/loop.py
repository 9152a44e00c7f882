"""The training loop: stages run in order, each resumable, budgeted and checkpointed.

Reads top to bottom: logging, mesh, per stage (input, model and optimizer, sharding, restore or init,
update step, loop), and the stage end (budget, steps, preemption or numerical fault).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from wamjax.checkpoint import adapters, clip_import
from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.norm_stats import checked_norm_stats, has_norm_stats
from wamjax.checkpoint.wan_vae_import import import_diffusers_wan_vae
from wamjax.compilation_cache import enable_compilation_cache
from wamjax.flops.goodput import GoodputRecorder
from wamjax.flops.ledger import MODEL_UNITS, FlopLedger, stage_step_count
from wamjax.flops.peak import peak_flops_per_device
from wamjax.flops.stage import StepFlops, train_step_flops
from wamjax.models import vae as vae_lib
from wamjax.parallel.mesh import logical_rules, make_mesh, replicated
from wamjax.parallel.placement import check_placement, device_batch
from wamjax.paths import PathLike, as_path, is_uri
from wamjax.stages import StageSpec, is_trainable, stage_list, stage_spec
from wamjax.train import compiled_step
from wamjax.train import inputs as inputs_lib
from wamjax.train.guards import NonfiniteGuard
from wamjax.train.hooks import HookFactory, StageContext, check_hooks
from wamjax.train.init_from import StageResult, initialize_from
from wamjax.train.metrics import MetricsWriter, format_progress, metrics_row
from wamjax.train.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption
from wamjax.train.setup import jit_train_step, sharded_init
from wamjax.train.stage_step import build_stage_step
from wamjax.train.stage_step import frozen_params as stage_frozen_params
from wamjax.train.step import TrainState


def train(config: ml_collections.ConfigDict, workdir: PathLike, started: float | None = None,
          hooks: Sequence[HookFactory] | None = None) -> list[StageResult]:
    """Runs the configured stage(s) in `workdir`, resuming from its latest complete checkpoint.

    `hooks` build what runs beside the step in each stage (`wamjax.eval.hooks.loop_hooks()` for the
    evaluations `config.eval` schedules); a config that schedules evaluation without hooks is refused.

    `started` (a `time.time()`) is when the process began: goodput counts the time before this call as init.
    """
    check_hooks(config, hooks)
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with GoodputRecorder(workdir, jax.process_index(), jax.process_count(), started) as goodput:
        return _train(config, workdir, goodput, tuple(hooks or ()))


def _train(config: ml_collections.ConfigDict, workdir: Any, goodput: GoodputRecorder,
           hooks: Sequence[HookFactory]) -> list[StageResult]:
    # --- Logging -----------------------------------------------------------------------------------
    is_lead = jax.process_index() == 0
    enable_compilation_cache(config.train.get("compilation_cache_dir", ""), workdir)
    writer = MetricsWriter(workdir, enabled=is_lead)
    if is_lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # --- Mesh --------------------------------------------------------------------------------------
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh.rules)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    if str(config.get("lora", {}).get("base", "")):
        raise ValueError(f"lora.base={config.lora.base!r}: it is written by the trainer into adapters-only "
                         "checkpoints; name a LoRA stage's base with stages.<stage>.init_from")
    keep_steps = ckpt.KeepSteps()  # steps a later stage still reads (an adapters-only stage's base)
    manager = ckpt.make_manager(workdir, config.checkpoint, keep_steps)
    latest = manager.latest_step()
    resume_ledger = None
    if latest is not None:
        resume_ledger = FlopLedger.from_json(ckpt.read_json_item(ckpt.step_dir(workdir, latest), "ledger"))
        logging.info("found checkpoint at step %d (stage %s)", latest, resume_ledger.current_stage)
        for name in resume_ledger.dense_stages():
            logging.warning(
                "ledger stage %s: its stored FLOPs (%.3e) are dense counts (every attention pair, written before "
                "mask-aware counting); a stage that resumes is converted to model FLOPs, a completed one keeps "
                "them, marked units=dense", name, resume_ledger.stage_flops(name))

    results: list[StageResult] = []
    previous: StageResult | None = None
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)), Preemption() as preemption:
            for stage in stage_list(config):
                if resume_ledger is not None and stage in resume_ledger.completed_stages:
                    logging.info("stage %s already completed in this workdir; skipping", stage)
                    previous = StageResult(stage, None, resume_ledger.stage_end_step[stage], "completed")
                    continue
                result = run_stage(stage_spec(config, stage), config=config, workdir=workdir, mesh=mesh,
                                   rules=rules, manager=manager, writer=writer, previous=previous,
                                   preemption=preemption, goodput=goodput, hooks=hooks, keep_steps=keep_steps)
                results.append(result)
                previous = result
    finally:
        goodput.switch("checkpoint")
        manager.wait_until_finished()
        writer.close()
    return results


@dataclasses.dataclass(frozen=True)
class _StageRun:
    """What the steps of a running stage read besides the state: its step, input, frozen parts and bookkeeping."""

    spec: StageSpec
    config: ml_collections.ConfigDict  # saved whole with every checkpoint
    train_step: Any
    data_iter: Any
    text: Any
    frozen_params: Any
    saved_config: dict  # the run config saved with every checkpoint (with an adapters-only stage's base)
    saved_state: Any  # TrainState -> what a checkpoint holds of it
    mesh: jax.sharding.Mesh
    rules: Any
    manager: Any
    writer: MetricsWriter
    goodput: GoodputRecorder
    preemption: Preemption
    hooks: Sequence[Any]
    norm_stats: dict
    flops: StepFlops
    total_steps: int
    budget_limited: bool


def run_stage(spec: StageSpec, *, config: ml_collections.ConfigDict, workdir: Any, mesh: jax.sharding.Mesh,
              rules: Any, manager: Any, writer: MetricsWriter, previous: StageResult | None, preemption: Preemption,
              goodput: GoodputRecorder | None = None, hooks: Sequence[HookFactory] = (),
              keep_steps: ckpt.KeepSteps | None = None) -> StageResult:
    """Runs one stage to its end (steps or budget), from its checkpoint, init_from, the previous stage, or fresh.

    `config` is the whole run config, stored with every checkpoint; the stage's settings come from `spec`.
    """
    stage = spec.name
    flops = train_step_flops(spec)
    goodput = goodput or GoodputRecorder(workdir, jax.process_index(), jax.process_count())
    goodput.begin_stage(stage, previous.final_step if previous is not None else (manager.latest_step() or 0),
                        flops.train_per_step)
    goodput.switch("init")
    # One count for the loop's end, the schedule and `flops.estimate`: the budget may buy fewer than `steps`.
    total_steps = stage_step_count(spec.steps, spec.budget_flops, flops.train_per_step)

    # --- Input -------------------------------------------------------------------------------------
    dataset, norm_stats = inputs_lib.make_stage_dataset(spec, jax.process_index(), jax.process_count())
    # Every checkpoint of a run on real data carries the stats it trained with; refuse to start without them.
    norm_stats = checked_norm_stats(config, norm_stats, where=f"stage {stage!r}'s data")
    data_iter = iter(dataset)
    text = inputs_lib.TextEmbedder(config.text, spec.model.text_dim)

    # --- Model, optimizer and sharding -------------------------------------------------------------
    latest = manager.latest_step()
    saved_ledger = None
    if latest is not None:
        saved_ledger = FlopLedger.from_json(ckpt.read_json_item(ckpt.step_dir(workdir, latest), "ledger"))
    resuming = saved_ledger is not None and saved_ledger.current_stage == stage
    start_global = previous.final_step if previous is not None else (latest or 0)
    # A resumed stage's schedule and spike counters start where the stage began, not where this attempt does.
    stage_start = saved_ledger.stage_start_step[stage] if resuming else int(start_global)
    built = build_stage_step(spec, mesh, rules, total_steps=total_steps, stage_start_step=stage_start)
    layout = sharded_init(built.init_boxed, mesh, rules, seed=spec.seed)
    base = _adapters_base(spec, previous, workdir, keep_steps)
    saved_config = config.to_dict()
    saved_state = (lambda s: s) if not base else functools.partial(_adapters_state, spec.trainable)
    if base:
        saved_config["lora"]["base"] = base
        logging.info("stage %s: checkpoints hold the adapters and the modules trained in full (lora."
                     "save_adapters_only); their base is %s", stage, base)

    # --- Restore or initialize ---------------------------------------------------------------------
    if resuming:
        abstract = saved_state(layout.abstract_state)
        state, ledger, norm_stats = _resume(spec, manager, latest, abstract, data_iter, norm_stats, flops, goodput)
        if base:  # the frozen base from where the stage took it, the saved leaves on top
            start = initialize_from(spec, layout.init(jax.random.PRNGKey(spec.seed)), layout.shardings, previous,
                                    workdir)
            state = _onto(start, state)
        writer.truncate_after(latest)
    else:
        state = layout.init(jax.random.PRNGKey(spec.seed))
        state = state.replace(step=jnp.asarray(start_global, jnp.int32))
        state = initialize_from(spec, state, layout.shardings, previous, workdir)
        ledger = saved_ledger or FlopLedger()
        ledger.start_stage(stage, int(start_global))
        writer.truncate_after(int(start_global))  # rows of an earlier attempt at this stage are redone
    check_placement(state.params, layout.shardings.params, mesh, log=logging.info)
    frozen = _frozen_params(config, spec, mesh)

    # --- Update step and hooks ---------------------------------------------------------------------
    train_step = jit_train_step(built.step_fn, layout.shardings)
    if str(config.train.get("compiled_step", "") or ""):
        train_step = compiled_step.FileBackedStep(
            train_step, compiled_step.stage_path(config, stage),
            lambda args: compiled_step.fingerprint(config, stage, mesh, args, total_steps=total_steps,
                                                   stage_start_step=stage_start),
            is_lead=jax.process_index() == 0)
    if spec.views is not None and int(config.get("eval", {}).get("every_steps", 0)) > 0:
        raise ValueError(f"eval.every_steps={config.eval.every_steps} with data.view_layout='tokens' in stage "
                         f"{stage!r}: the offline evaluation reads one camera; set eval.every_steps=0")
    context = StageContext(config=config, spec=spec, text=text, mesh=mesh, rules=rules, vae_params=frozen,
                           norm_stats=norm_stats, writer=writer, workdir=str(workdir))
    stage_hooks = [hook for hook in (factory(context) for factory in hooks) if hook is not None]
    run = _StageRun(spec=spec, config=config, train_step=train_step, data_iter=data_iter, text=text,
                    frozen_params=frozen, saved_config=saved_config, saved_state=saved_state, mesh=mesh,
                    rules=rules, manager=manager, writer=writer, goodput=goodput,
                    preemption=preemption, hooks=stage_hooks, norm_stats=norm_stats, flops=flops,
                    total_steps=total_steps, budget_limited=total_steps < spec.steps)
    _log_stage_start(run)
    return _run_steps(run, state, ledger)


def _resume(spec: StageSpec, manager: Any, latest: int, abstract_state: Any, data_iter: Any, norm_stats: dict,
            flops: StepFlops, goodput: GoodputRecorder) -> tuple[TrainState, FlopLedger, dict]:
    """The stage's state (what the checkpoint holds of it), ledger and stats from its latest checkpoint (the data
    iterator restored in place)."""
    stage = spec.name
    goodput.switch("restore")
    state, ledger_json, _, norm_stats_saved = ckpt.restore(manager, latest, abstract_state, data_iter)
    goodput.switch("init")
    goodput.resumed_at(int(state.step))
    ledger = FlopLedger.from_json(ledger_json)
    if ledger.stage_units(stage) != MODEL_UNITS:
        dense_flops = ledger.stage_flops(stage)
        factor = ledger.to_model_units(stage, flops.train_per_step, flops.dense_per_step, flops.hardware_per_step)
        logging.warning("stage %s: the checkpoint's ledger holds dense FLOPs (%.3e, written before "
                        "mask-aware counting); converted to model FLOPs x %.4f = %.3e (hardware %.3e)",
                        stage, dense_flops, factor, ledger.stage_flops(stage), ledger.stage_hardware_flops(stage))
    norm_stats = norm_stats_saved if has_norm_stats(norm_stats_saved) else norm_stats
    logging.info("stage %s: resumed from step %d", stage, latest)
    return state, ledger, norm_stats


def _adapters_base(spec: StageSpec, previous: StageResult | None, workdir: Any,
                   keep_steps: ckpt.KeepSteps | None) -> str:
    """Where an adapters-only stage's frozen base is ("" for a stage whose checkpoints hold every parameter)."""
    if not spec.save_adapters_only:
        return ""
    if spec.init_from:
        return spec.init_from
    if previous is None:
        raise ValueError(f"lora.save_adapters_only: stage {spec.name!r} has no base to save its adapters against; "
                         f"set stages.{spec.name}.init_from (a checkpoint or a diffusers Wan folder) or run a stage "
                         "before it")
    if keep_steps is not None:
        keep_steps.steps.add(int(previous.final_step))  # never deleted while this stage's checkpoints need it
    path = ckpt.step_dir(workdir, previous.final_step)
    return str(path if is_uri(path) else os.path.abspath(str(path)))


def _adapters_state(trainable: str, state: TrainState) -> TrainState:
    """What an adapters-only checkpoint holds of `state`: every leaf but the frozen parameters (and their EMA)."""
    keep = functools.partial(is_trainable, trainable=trainable)
    ema = None if state.ema_params is None else adapters.subset(state.ema_params, keep)
    return state.replace(params=adapters.subset(state.params, keep), ema_params=ema)


def _onto(start: TrainState, saved: TrainState) -> TrainState:
    """`saved` (an adapters-only state) with the frozen parameters of `start` filled in."""
    def fill(full: Any, part: Any) -> Any:
        return None if full is None else adapters.onto_base(full, part or {}, where="resuming the adapters")

    return saved.replace(params=fill(start.params, saved.params), ema_params=fill(start.ema_params, saved.ema_params))


def _frozen_params(config: ml_collections.ConfigDict, spec: StageSpec, mesh: jax.sharding.Mesh) -> Any:
    """The frozen encoders' parameters the step reads, replicated: the VAE's (None on cached latents) and, for an
    image-conditioned model, the CLIP tower's."""
    vae_params = None
    if not spec.uses_latents_cache:
        vae_params = jax.device_put(_vae_params(config, spec.vae), replicated(mesh))
    if spec.image_encoder is None:
        return vae_params
    logging.info("image encoder: %s CLIP vision tower (%d tokens per first frame), frozen in the step",
                 config.image.encoder or "RANDOM (image.encoder is empty; CPU smoke runs only)",
                 spec.image_encoder.num_tokens)
    image_params = jax.device_put(clip_import.encoder_params(config, spec.image_encoder), replicated(mesh))
    return stage_frozen_params(vae_params, image_params)


def _log_stage_start(run: _StageRun) -> None:
    spec, flops = run.spec, run.flops
    logging.info(
        "stage %s: mode=%s steps=%d%s trainable=%s | %.3e model FLOPs/step (fwd %.3e/sample, frozen %.3e/step; "
        "%.3e hardware with %s, self-attention %.4f visible)%s",
        spec.name, spec.mode, run.total_steps,
        f" (what the budget buys of {spec.steps})" if run.budget_limited else "",
        spec.trainable, flops.train_per_step, flops.forward_per_sample, flops.frozen_per_step,
        flops.hardware_per_step, flops.attention_kernel, flops.attention.visible_fraction,
        f" | budget {spec.budget_flops:.3e} model FLOPs" if spec.budget_flops else "",
    )


def _run_steps(run: _StageRun, state: TrainState, ledger: FlopLedger) -> StageResult:
    """Steps the stage to its end (steps, budget), saving on schedule; raises Preempted after a SIGTERM's save.

    Metrics stay on device between fetches so that dispatch runs ahead of the device; the host blocks only on
    log, checkpoint, stage-end and preemption steps (see `NonfiniteGuard` for what that costs).
    """
    spec, config, flops, goodput, writer = run.spec, run.config, run.flops, run.goodput, run.writer
    stage, total_steps, budget = spec.name, run.total_steps, spec.budget_flops
    batch_size = spec.clip.batch_size
    peak = peak_flops_per_device(config.flops.device_kind or None)
    tokens_per_step = (flops.video_tokens + flops.action_tokens) * batch_size
    step = int(state.step)
    stage_done = ledger.stage_steps(stage)
    reason = "steps"
    guard = NonfiniteGuard(int(config.optim.max_consecutive_nonfinite))
    every = max(1, int(config.checkpoint.every_steps))
    ledger_config = run.saved_config
    last_time = fetch_time = time.perf_counter()
    steps_since_fetch = 0
    steps_since_start = 0  # steps this process ran in this stage
    spike_skips = 0  # loss-spike skips of the stage seen at the last log step (optim.skip_step_on_spike)
    data_seconds = 0.0  # host time waiting for the next batch (reading, decoding, placing) since the last fetch
    while True:
        if stage_done >= total_steps:
            reason = "budget" if run.budget_limited else "steps"
            if run.budget_limited:
                logging.info("stage %s: FLOP budget %.3e spent at step %d (one more step would exceed it)",
                             stage, budget, step)
            break
        goodput.switch("data")
        data_start = time.perf_counter()
        host_batch = next(run.data_iter)
        batch = device_batch(host_batch, run.text, run.mesh, run.rules)
        data_seconds += time.perf_counter() - data_start
        goodput.switch("step")  # the first call's tracing and compilation go to `compile`
        state, device_metrics = run.train_step(state, batch, run.frozen_params)
        step += 1
        goodput.step_done(step)
        steps_since_start += 1
        stage_done += 1
        steps_since_fetch += 1
        guard.add(step, device_metrics)
        stage_ends = stage_done >= total_steps
        preempt = run.preemption.reached(step)  # every step on every process: they agree on the step to stop at
        log_step = step % config.train.log_every == 0 or stage_ends or preempt
        finished = stage_ends
        save_step = step % every == 0 or preempt or finished
        # Blocks until this step is done; raises NumericalFault before anything is saved past a fault.
        metrics = guard.fetch() if log_step or save_step else None
        now = time.perf_counter()
        # Host time between dispatches; a fetch's wait for the device lands on its step, so the ledger's
        # per-stage seconds still sum to wall time.
        ledger.record(stage, flops.train_per_step, batch_size, tokens_per_step, now - last_time,
                      frozen_flops=flops.frozen_per_step, hardware_flops=flops.hardware_per_step)
        last_time = now
        if metrics is not None:
            step_time = (now - fetch_time) / steps_since_fetch
            data_time = data_seconds / steps_since_fetch
            fetch_time, steps_since_fetch, data_seconds = now, 0, 0.0
            if log_step:
                row = metrics_row(stage, step, metrics, step_time, flops, ledger, budget, peak, run.mesh.size,
                                   batch_size, tokens_per_step)
                row["data_s_per_step"] = data_time  # of step_s: the share spent waiting for input
                if row.get("stage_spike_skips", 0) > spike_skips:
                    logging.warning("stage %s: %d update(s) skipped as loss spikes by step %d (%d in the stage; "
                                    "optim.skip_step_on_spike=%s)", stage, row["stage_spike_skips"] - spike_skips,
                                    step, row["stage_spike_skips"], config.optim.skip_step_on_spike)
                    spike_skips = row["stage_spike_skips"]
                writer.write(row)
                logging.info(format_progress(row, total_steps, stage_done))
        if run.hooks:  # evaluations, with the EMA params when there are
            goodput.switch("eval")
        for hook in run.hooks:
            hook.maybe_run(step, state.params if state.ema_params is None else state.ema_params, stage_ends)

        if finished:
            ledger.end_stage(stage, step)
        if save_step:
            goodput.switch("checkpoint")  # the blocking part (an async save's device-to-host copy)
            ckpt.save(run.manager, step, run.saved_state(state), run.data_iter, ledger.to_json(), ledger_config,
                      run.norm_stats, force=True)
        if log_step or save_step or steps_since_start == 1:  # the first step: its compile is on record
            goodput.flush()
        if preempt:
            goodput.switch("checkpoint")
            run.manager.wait_until_finished()
            goodput.flush()
            logging.warning("preemption checkpoint at step %d written; exiting %d", step, PREEMPTED_EXIT_CODE)
            raise Preempted()
    goodput.switch("checkpoint")
    if stage not in ledger.completed_stages:
        ledger.end_stage(stage, step)
        ckpt.save(run.manager, step, run.saved_state(state), run.data_iter, ledger.to_json(), ledger_config,
                  run.norm_stats, force=True)
    run.manager.wait_until_finished()
    goodput.flush()
    writer.write_event({"event": "stage_end", "stage": stage, "step": step, "reason": reason,
                        "stage_flops": ledger.stage_flops(stage),
                        "stage_hardware_flops": ledger.stage_hardware_flops(stage),
                        "flops_units": ledger.stage_units(stage)})
    logging.info("stage %s ended at step %d (%s); stage FLOPs %.3e", stage, step, reason, ledger.stage_flops(stage))
    return StageResult(stage, state, step, reason)



def _vae_params(config: ml_collections.ConfigDict, vae_cfg: Any) -> Any:
    if config.vae.weights:

        _, params = import_diffusers_wan_vae(config.vae.weights)
        return params
    logging.info("vae: RANDOM frozen %s VAE (vae.weights is empty); fine for CPU smoke runs only", config.vae.size)
    return vae_lib.init_vae_params(vae_cfg, jax.random.PRNGKey(config.vae.seed))
