"""Will it fit? The real train step (or the policy's denoising call) compiled for a TPU topology on a CPU.

  python -m wamjax.compile_check --config=configs/wam.py:size=wan14b,stage=video_pretrain --topology=v5p:4x4x4 \
      [--what=train|inference] [--stage=NAME] [--config.x=y ...]

The devices come from libtpu's description of the named topology (`pip install 'wamjax[tpu]'`); no TPU is
needed and nothing of the model's size is allocated: the train state, the batch and the frozen VAE's
parameters are ShapeDtypeStructs carrying the shardings the loop would give them, and the function compiled
is the loop's own jitted step (`train.setup.jit_train_step` of `train.step.make_train_step`).

Printed per chip: memory (arguments, outputs, temporaries, total against the chip's HBM), XLA's FLOPs
against the analytic hardware count (`wamjax.flops.analytic`: what the TPU kernel computes at its block sizes,
remat included), and a roofline bound on the step time (from hardware FLOPs) and on MFU (model FLOPs: attention
over the pairs the mask shows) from the chip's peak FLOP/s, HBM bandwidth and ICI bandwidth (`wamjax.flops.peak`):
the collectives of the compiled step (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute; bytes
per chip, `wamjax.flops.collectives`) over the chip's links give the communication bound, and the row says which
of compute, memory and communication bounds the step. XLA's cost
analysis counts a loop body once, so for a scanned block stack the step is also compiled with 1 and 2 unrolled
layers and the count extrapolated (`--xla_flops`). When the config encodes frames with the VAE inside the step
(no `data.latents_cache`), the step is compiled again on latents and the VAE's share is reported
(`--vae_delta`).

Exit codes: 0 fits; 1 does not fit (the shortfall is named); 2 bad input (unknown topology, bad mesh or batch).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from wamjax.compile_steps import (
    GIB,
    CompileCheckError,
    Compiled,
    Topology,
    compile_chunk_step,
    compile_policy_step,
    compile_train_step,
    get_topology,
    inference_options,
    resolve_stage,
    save_train_step,
    unrolled,
)
from wamjax.diffusion.sampler import SamplerOptions
from wamjax.flops.analytic import SequenceShape, forward_flops
from wamjax.flops.stage import train_step_flops
from wamjax.models.attention import resolve_attention
from wamjax.parallel.mesh import MESH_AXES, make_mesh
from wamjax.stages import stage_spec


@dataclasses.dataclass
class Report:
    """Everything the check found, per chip unless named otherwise."""

    what: str
    stage: str
    topology: Topology
    mesh: dict[str, int]
    global_batch: int
    compiled: Compiled
    analytic_flops: float  # hardware FLOPs of the whole step (all chips): what the kernel computes, remat, frozen
    model_flops: float  # model FLOPs of the whole step (visible attention pairs, 3 x forward; MFU counts these)
    xla_flops: float | None  # XLA's FLOPs of the whole step (all chips), loops counted in full; None: not run
    xla_bytes_accessed: float | None  # per chip, loops counted in full
    vae_in_step: bool
    vae_delta: Compiled | None = None  # the same step on cached latents (no VAE), for the VAE's share
    opaque_attention: bool = False  # attention is a Pallas kernel: XLA's cost analysis counts none of its FLOPs
    collectives: dict[str, float] | None = None  # kind -> bytes per chip sent + received, loops counted in full

    @property
    def compute_time(self) -> float:
        """Seconds at peak FLOP/s: XLA's FLOPs unless they miss an opaque (Pallas) attention kernel, else the
        analytic count."""
        use_xla = self.xla_flops is not None and not self.opaque_attention
        flops = self.xla_flops if use_xla else self.analytic_flops
        return flops / self.topology.chips / self.topology.peak_flops

    @property
    def memory_time(self) -> float:
        """Seconds to move XLA's bytes accessed at full HBM bandwidth (0 when not counted)."""
        return (self.xla_bytes_accessed or 0.0) / self.topology.hbm_bandwidth

    @property
    def communication_time(self) -> float | None:
        """Seconds for each chip's collective traffic over all its ICI links at once (an optimistic bound: a
        collective over one mesh axis uses only that axis's links); None when not counted or the ICI is unknown."""
        if self.collectives is None or not self.topology.ici_bandwidth:
            return None
        return sum(self.collectives.values()) / self.topology.ici_bandwidth

    @property
    def bound_by(self) -> str:
        """Which of compute, memory (HBM) and communication (ICI) bounds the step."""
        times = {"compute": self.compute_time, "memory": self.memory_time,
                 "communication": self.communication_time or 0.0}
        return max(times, key=times.get)

    @property
    def fits(self) -> bool:
        return not self.compiled.out_of_memory and self.compiled.total_bytes <= self.topology.hbm_bytes

    @property
    def flop_ratio(self) -> float | None:
        return None if self.xla_flops is None else self.xla_flops / self.analytic_flops

    @property
    def step_time_bound(self) -> float:
        """Roofline lower bound on the step time: the largest of compute at peak, HBM traffic at full bandwidth
        and collective traffic at full ICI bandwidth (none of them overlapped away)."""
        return max(self.compute_time, self.memory_time, self.communication_time or 0.0)

    @property
    def mfu_bound(self) -> float:
        return self.model_flops / (self.topology.chips * self.topology.peak_flops * self.step_time_bound)

    def shortfall(self) -> str:
        c, t = self.compiled, self.topology
        over = c.total_bytes - t.hbm_bytes
        text = (f"does not fit: needs {'at least ' if c.out_of_memory else ''}{c.total_bytes / GIB:.2f} GiB per "
                f"chip, {over / GIB:.2f} GiB over the {t.hbm_bytes / GIB:.0f} GiB of HBM of a {t.device_kind} chip")
        if c.out_of_memory:
            text += f" (the TPU compiler refused it: {c.out_of_memory})"
        return text

    def to_json(self) -> dict[str, Any]:
        """The report as plain numbers (bytes and seconds per chip unless named otherwise)."""
        c, t = self.compiled, self.topology
        out = {
            "what": self.what, "stage": self.stage, "topology": t.name, "chips": t.chips,
            "device_kind": t.device_kind, "mesh": self.mesh, "global_batch": self.global_batch,
            "fits": self.fits, "out_of_memory": c.out_of_memory, "hbm_bytes": t.hbm_bytes,
            "argument_bytes": c.argument_bytes, "output_bytes": c.output_bytes, "alias_bytes": c.alias_bytes,
            "temp_bytes": c.temp_bytes, "code_bytes": c.code_bytes, "host_bytes": c.host_bytes,
            "total_bytes": c.total_bytes, "compile_s": c.compile_s, "analytic_flops": self.analytic_flops,
            "model_flops": self.model_flops, "xla_flops": self.xla_flops, "flop_ratio": self.flop_ratio,
            "step_time_bound_s": self.step_time_bound, "mfu_bound": self.mfu_bound,
            "opaque_attention": self.opaque_attention, "compute_s": self.compute_time, "memory_s": self.memory_time,
            "communication_s": self.communication_time, "collective_bytes": self.collectives,
            "ici_bandwidth": t.ici_bandwidth, "bound": self.bound_by,
        }
        if self.vae_delta is not None:
            out["vae_added_bytes"] = c.total_bytes - self.vae_delta.total_bytes
        return out

    def format(self) -> str:
        t, c = self.topology, self.compiled
        batch = (f"{self.global_batch} global = {self.global_batch / t.chips:g} per chip" if self.what == "train"
                 else "one observation (the policy's call)")
        lines = [
            f"compile_check: {self.what} step of stage {self.stage} on {t.name} ({t.chips} chips, {t.device_kind})",
            f"mesh              {self.mesh}",
            f"batch             {batch}",
            f"compile time      {c.compile_s:.1f} s",
            "memory per chip (GiB):",
            f"  arguments       {c.argument_bytes / GIB:10.3f}",
        ]
        if c.out_of_memory:
            lines += [
                f"  temporaries     {c.temp_bytes / GIB:10.3f}  (as the compiler counted them when it gave up)",
                f"  total           {c.total_bytes / GIB:10.3f}+ of {t.hbm_bytes / GIB:.0f} GiB HBM",
            ]
        else:
            lines += [
                f"  outputs         {c.output_bytes / GIB:10.3f}  ({c.alias_bytes / GIB:.3f} aliased to donated "
                "arguments)",
                f"  temporaries     {c.temp_bytes / GIB:10.3f}",
                f"  code            {c.code_bytes / GIB:10.3f}",
                f"  total           {c.total_bytes / GIB:10.3f}  of {t.hbm_bytes / GIB:.0f} GiB HBM "
                f"({100 * c.total_bytes / t.hbm_bytes:.1f}%)",
            ]
        if c.host_bytes:
            lines.append(f"  host (offload)  {c.host_bytes / GIB:10.3f}")
        lines.append(f"FLOPs per step    analytic {self.analytic_flops:.4e} hardware (model {self.model_flops:.4e})")
        if self.xla_flops is not None:
            lines.append(f"                  XLA      {self.xla_flops:.4e}  (XLA / analytic = {self.flop_ratio:.4f})")
            if self.opaque_attention:
                lines.append("                  (XLA counts none of the Pallas attention kernel's FLOPs; the roofline "
                             "uses the analytic count)")
        else:
            lines.append("                  XLA      not counted (--noxla_flops, an inference loop, or a compile that "
                         "ran out of memory)")
        bound = "" if self.xla_bytes_accessed else " [compute only: no XLA byte count]"
        ici = f", ICI {t.ici_bandwidth / 1e9:.0f} GB/s" if t.ici_bandwidth else ""
        lines.append(f"roofline          step >= {self.step_time_bound * 1e3:.2f} ms, {self.bound_by}-bound "
                     f"(peak {t.peak_flops / 1e12:.0f} TFLOP/s, HBM {t.hbm_bandwidth / 1e9:.0f} GB/s{ici} per chip); "
                     f"MFU <= {100 * self.mfu_bound:.1f}%{bound}")
        comm = self.communication_time
        lines.append(f"                  compute {self.compute_time * 1e3:.2f} ms, HBM {self.memory_time * 1e3:.2f} "
                     "ms, " + ("communication not counted" if comm is None else f"communication {comm * 1e3:.2f} ms"))
        if self.collectives:
            lines.append("collectives       per chip, sent + received: " + ", ".join(
                f"{kind} {b / GIB:.3f} GiB" for kind, b in sorted(self.collectives.items(), key=lambda kv: -kv[1])))
        if self.vae_delta is not None:
            d = self.vae_delta
            lines.append(
                f"frozen VAE        encodes frames in the step: adds {(c.total_bytes - d.total_bytes) / GIB:.3f} GiB "
                f"per chip ({d.total_bytes / GIB:.3f} GiB on cached latents), "
                f"{(c.flops - d.flops) * t.chips:.4e} XLA FLOPs per step; set data.latents_cache to drop it"
            )
        elif self.vae_in_step and self.what == "train":
            lines.append("frozen VAE        encodes frames in the step (run with --vae_delta for its share)")
        lines.append("result            fits" if self.fits else f"result            {self.shortfall()}")
        return "\n".join(lines)


@dataclasses.dataclass
class ChunkReport:
    """The KV-cached chunk call of a chunk-causal policy (`--what=inference`): memory per chip of the whole call,
    and its roofline latency bound from one model evaluation's XLA cost (per chip; layers extrapolated from 1-
    and 2-layer compiles) times the evaluations a chunk runs."""

    stage: str
    topology: Topology
    mesh: dict[str, int]
    options: SamplerOptions
    compiled: Compiled  # the whole chunk call: denoising iterations and the clean commit into the cache
    forward_flops: float  # one model evaluation (the CFG pair when guided), per chip
    forward_bytes: float
    forward_collectives: dict[str, float]
    forwards: int  # evaluations a chunk runs: iterations not skipped by a fixed step mask, plus the commit
    min_forwards: int  # with a dynamic step cache: the fewest (it never skips twice in a row); else = forwards

    @property
    def fits(self) -> bool:
        c = self.compiled
        return not c.out_of_memory and c.total_bytes <= self.topology.hbm_bytes

    @property
    def forward_times(self) -> dict[str, float]:
        t = self.topology
        comm = sum(self.forward_collectives.values()) / t.ici_bandwidth if t.ici_bandwidth else 0.0
        return {"compute": self.forward_flops / t.peak_flops, "memory": self.forward_bytes / t.hbm_bandwidth,
                "communication": comm}

    @property
    def forward_bound(self) -> float:
        return max(self.forward_times.values())

    @property
    def chunk_latency_bound(self) -> float:
        """Seconds: every evaluation at its roofline bound, none overlapped (a lower bound on the chunk's latency
        when each runs as compiled)."""
        return self.forwards * self.forward_bound

    def to_json(self) -> dict[str, Any]:
        c, t, o = self.compiled, self.topology, self.options
        return {
            "what": "inference", "stage": self.stage, "topology": t.name, "chips": t.chips,
            "device_kind": t.device_kind, "mesh": self.mesh, "fits": self.fits, "out_of_memory": c.out_of_memory,
            "hbm_bytes": t.hbm_bytes, "argument_bytes": c.argument_bytes, "temp_bytes": c.temp_bytes,
            "total_bytes": c.total_bytes, "compile_s": c.compile_s,
            "options": {"num_steps": o.num_steps, "action_steps": o.resolved_action_steps, "cfg_scale": o.cfg_scale,
                        "cfg_parallel": o.cfg_parallel, "video_stop_t": o.video_stop_t,
                        "step_cache_mask": o.step_cache_mask, "step_cache_threshold": o.step_cache_threshold},
            "forwards_per_chunk": self.forwards, "min_forwards_per_chunk": self.min_forwards,
            "forward_flops_per_chip": self.forward_flops, "forward_bytes_per_chip": self.forward_bytes,
            "forward_collective_bytes": self.forward_collectives, "forward_bound_s": self.forward_bound,
            "forward_times_s": self.forward_times, "bound": max(self.forward_times, key=self.forward_times.get),
            "chunk_flops_per_chip": self.forwards * self.forward_flops,
            "chunk_bytes_per_chip": self.forwards * self.forward_bytes,
            "chunk_latency_bound_ms": 1e3 * self.chunk_latency_bound,
            "chunk_latency_bound_min_ms": 1e3 * self.min_forwards * self.forward_bound,
        }

    def format(self) -> str:
        c, t, o = self.compiled, self.topology, self.options
        times = self.forward_times
        skip = (f"; a dynamic step cache (threshold {o.step_cache_threshold}) can skip down to {self.min_forwards}"
                if self.min_forwards != self.forwards else "")
        lines = [
            f"compile_check: KV-cached chunk of stage {self.stage} on {t.name} ({t.chips} chips, {t.device_kind})",
            f"mesh              {self.mesh}",
            f"sampler           {o.num_steps} video / {o.resolved_action_steps} action steps, video to t = "
            f"{o.video_stop_t:g}, cfg_scale {o.cfg_scale:g}, cfg_parallel {o.cfg_parallel}, step cache "
            f"{o.step_cache_mask or o.step_cache_threshold or 'off'}",
            f"compile time      {c.compile_s:.1f} s",
            f"memory per chip   {c.total_bytes / GIB:.3f} GiB of {t.hbm_bytes / GIB:.0f} (arguments "
            f"{c.argument_bytes / GIB:.3f}, temporaries {c.temp_bytes / GIB:.3f})",
            f"one evaluation    {self.forward_flops:.4e} FLOPs, {self.forward_bytes / GIB:.3f} GiB of HBM traffic, "
            f"{sum(self.forward_collectives.values()) / GIB:.3f} GiB over ICI per chip: compute "
            f"{times['compute'] * 1e3:.2f} ms, HBM {times['memory'] * 1e3:.2f} ms, ICI "
            f"{times['communication'] * 1e3:.2f} ms",
            f"per chunk         {self.forwards} evaluations (iterations + the clean commit){skip}",
            f"roofline          chunk latency >= {self.chunk_latency_bound * 1e3:.1f} ms "
            f"({max(times, key=times.get)}-bound; compiled, not run)",
            "result            fits" if self.fits else f"result            does not fit: {c.total_bytes / GIB:.2f} "
            f"GiB per chip{' (the compiler refused it)' if c.out_of_memory else ''}",
        ]
        return "\n".join(lines)


def check_chunk(config: ml_collections.ConfigDict, topo: Topology, mesh: Any, stage: str, num_steps: int | None,
                log: Callable[[str], None]) -> ChunkReport:
    """The KV-cached chunk of a chunk-causal policy compiled for `topo` (see `ChunkReport`)."""
    with jax.set_mesh(mesh):  # cfg_parallel is checked against the topology's devices
        options = inference_options(config, num_steps)
    log(f"compiling the KV-cached chunk for {topo.name} ...")
    try:
        whole = compile_chunk_step(config, mesh, options)
        log("one model evaluation with 1 and 2 unrolled layers, for its cost ...")
        one = compile_chunk_step(unrolled(config, 1), mesh, options, forward_only=True)
        two = compile_chunk_step(unrolled(config, 2), mesh, options, forward_only=True)
    except ValueError as e:  # a setting the traced call refuses (e.g. cfg_parallel against the mesh), named
        raise CompileCheckError(str(e)) from e
    layers = int(config.model.num_layers) - 1
    flops = one.flops + layers * (two.flops - one.flops)
    bytes_ = one.bytes_accessed + layers * (two.bytes_accessed - one.bytes_accessed)
    collectives = {k: max(0.0, one.collectives.get(k, 0.0) + layers * (two.collectives.get(k, 0.0)
                                                                       - one.collectives.get(k, 0.0)))
                   for k in {*one.collectives, *two.collectives}}
    n = options.num_iterations
    if options.step_cache_mask is not None:
        run, least = sum(options.step_cache_mask), sum(options.step_cache_mask)
    elif options.step_cache_threshold is not None and options.step_cache_threshold < 1.0:
        run, least = n, n - n // 2  # the first iteration always runs, and never two skips in a row
    else:
        run = least = n
    mesh_sizes = {a: int(mesh.shape[a]) for a in MESH_AXES}
    return ChunkReport(stage, topo, mesh_sizes, options, whole, flops, bytes_, collectives, run + 1, least + 1)


def check(config: ml_collections.ConfigDict, topology: str, *, what: str = "train", stage: str | None = None,
          xla_flops: bool = True, vae_delta: bool = True, num_steps: int | None = None, save: str = "",
          stage_start_step: int = 0, log: Callable[[str], None] = lambda _: None) -> Report | ChunkReport:
    """Compiles the configured step for `topology` and measures it (see the module docstring); `save` writes the
    compiled train step to that file for `train.compiled_step` (the stage starting at `stage_start_step`)."""
    if what not in ("train", "inference"):
        raise CompileCheckError(f"--what={what!r}; expected 'train' or 'inference'")
    topo = get_topology(topology)
    try:
        mesh = make_mesh(config.mesh, topo.devices)
    except ValueError as e:
        raise CompileCheckError(f"mesh.* on {topo.name} ({topo.chips} chips): {e}") from e
    mesh_sizes = {a: int(mesh.shape[a]) for a in MESH_AXES}
    stage = resolve_stage(config, stage)
    try:
        spec = stage_spec(config, stage)
    except ValueError as e:
        raise CompileCheckError(str(e)) from e
    cfg = spec.model
    if what == "inference":
        if save:
            raise CompileCheckError("--save writes the train step; it is not offered with --what=inference")
        if not spec.joint:
            raise CompileCheckError(f"--what=inference needs a joint (action) stage; stage {stage} is "
                                    f"{spec.mode!r}: pass --stage=action_tune")
        if cfg.attention_layout == "chunk_causal":  # the policy acts chunk by chunk from a KV cache
            return check_chunk(config, topo, mesh, stage, num_steps, log)
        num_steps = 4 if num_steps is None else num_steps
        log(f"compiling the policy step for {topo.name} ...")
        compiled = compile_policy_step(config, mesh, num_steps)
        clip = SequenceShape(mode="joint", num_frames=spec.clip.num_frames, resolution=spec.clip.resolution,
                             text_length=spec.text_length, num_actions=spec.clip.actions)
        model = forward_flops(cfg, clip)["total"] * num_steps
        kernel = resolve_attention(cfg.attention, "tpu", cfg.dtype)
        hardware = forward_flops(cfg, clip, kernel=kernel)["total"] * num_steps
        return Report(what, stage, topo, mesh_sizes, 1, compiled, analytic_flops=hardware, model_flops=model,
                      xla_flops=None, xla_bytes_accessed=None, vae_in_step=True)

    log(f"compiling the train step of stage {stage} for {topo.name} ...")
    compiled = compile_train_step(config, stage, mesh, stage_start_step=stage_start_step)
    if save:
        if compiled.out_of_memory:
            raise CompileCheckError(f"--save={save}: the step does not fit {topo.name}, so there is nothing to save")
        save_train_step(config, stage, mesh, compiled, save, stage_start_step=stage_start_step)
        log(f"wrote the compiled train step to {save} (load it with --config.train.compiled_step={save})")
    # Hardware FLOPs (the TPU kernel at its block sizes, remat) bound the step time; model FLOPs give the MFU.
    step = train_step_flops(spec, pad_to_multiple=mesh_sizes["sequence"], backend="tpu")
    vae_in_step = not spec.uses_latents_cache
    analytic = step.hardware_per_step + (step.frozen_per_step if vae_in_step else 0.0)
    xla_total, bytes_accessed, collectives = None, None, None
    if xla_flops:
        if cfg.scan_layers and cfg.num_layers > 1:
            log("counting XLA FLOPs: the step with 1 and 2 unrolled layers ...")
            one = compile_train_step(unrolled(config, 1), stage, mesh)
            two = compile_train_step(unrolled(config, 2), stage, mesh)
            layers = cfg.num_layers - 1
            per_chip = one.flops + layers * (two.flops - one.flops)
            bytes_accessed = one.bytes_accessed + layers * (two.bytes_accessed - one.bytes_accessed)
            if not (one.out_of_memory or two.out_of_memory):
                xla_total = per_chip * topo.chips
                collectives = {kind: max(0.0, one.collectives.get(kind, 0.0) + layers * (
                    two.collectives.get(kind, 0.0) - one.collectives.get(kind, 0.0)))
                    for kind in {*one.collectives, *two.collectives}}
        elif not compiled.out_of_memory:
            per_chip, bytes_accessed = compiled.flops, compiled.bytes_accessed
            xla_total = per_chip * topo.chips
            collectives = dict(compiled.collectives)
    if xla_total is not None and spec.microbatches > 1:
        # The micro-batches are a scan whose body XLA counts once (the optimizer update outside it is then
        # counted `microbatches` times too: a small excess).
        xla_total *= spec.microbatches
        bytes_accessed = None if bytes_accessed is None else bytes_accessed * spec.microbatches
        collectives = None if collectives is None else {k: v * spec.microbatches for k, v in collectives.items()}
    delta = None
    # An image-conditioned step encodes its conditioning from the frames: it has no latents-only variant.
    if vae_in_step and vae_delta and spec.image_encoder is None:
        log("compiling the same step on cached latents, for the VAE's share ...")
        delta = compile_train_step(config, stage, mesh, latents=True)
    kernel = resolve_attention(cfg.attention, "tpu", cfg.dtype)
    return Report(what, stage, topo, mesh_sizes, spec.clip.batch_size, compiled, analytic_flops=analytic,
                  model_flops=step.train_per_step, xla_flops=xla_total, xla_bytes_accessed=bytes_accessed,
                  vae_in_step=vae_in_step, vae_delta=delta, opaque_attention=kernel == "splash",
                  collectives=collectives)


# ----------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/wam.py:size=tiny,stage=video_pretrain")
    try:
        report = check(f.config, f.topology, what=f.what, stage=f.stage or None, xla_flops=f.xla_flops,
                       vae_delta=f.vae_delta, num_steps=f.num_steps, save=f.save,
                       stage_start_step=f.stage_start_step,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    except CompileCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report.to_json(), indent=2) if f.format == "json" else report.format(), flush=True)
    sys.exit(0 if report.fits else 1)


def define_flags() -> None:
    """The command line's flags (defined only when run as a program)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/wam.py:size=wan14b,stage=action_tune.")
    flags.DEFINE_string("topology", None, "TPU topology to compile for: GEN:AxB[xC] (v5p:4x4x4) or v5p-128.")
    flags.DEFINE_enum("what", "train", ["train", "inference"], "The train step or the policy's denoising call.")
    flags.DEFINE_string("stage", "", "Stage to compile; default: the config's stage (the first one for 'all').")
    flags.DEFINE_bool("xla_flops", True, "Count XLA's FLOPs of a scanned stack from 1- and 2-layer compiles.")
    flags.DEFINE_bool("vae_delta", True, "When the VAE runs in the step, also compile on latents for its share.")
    flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
    flags.DEFINE_integer("num_steps", None, "Denoising steps of the policy call (--what=inference); default: the "
                         "config's inference.num_steps, else 4.")
    flags.DEFINE_string("save", "", "Write the compiled train step to this file (local or gs://): a job on the "
                        "topology loads it with --config.train.compiled_step=FILE and compiles nothing.")
    flags.DEFINE_integer("stage_start_step", 0, "With --save: the global step the stage starts at in the job (0 for "
                         "its first stage; a later stage's schedule counts from where the previous one ended).")
    flags.mark_flags_as_required(["topology"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
