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
over the pairs the mask shows) from the chip's peak FLOP/s and HBM bandwidth (`wamjax.flops.peak`). XLA's cost
analysis counts a loop body once, so for a scanned block stack the step is also compiled with 1 and 2 unrolled
layers and the count extrapolated (`--xla_flops`). When the config encodes frames with the VAE inside the step
(no `data.latents_cache`), the step is compiled again on latents and the VAE's share is reported
(`--vae_delta`).

Exit codes: 0 fits; 1 does not fit (the shortfall is named); 2 bad input (unknown topology, bad mesh or batch).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wamjax import stages as stages_lib
from wamjax.diffusion.sampler import SamplerOptions
from wamjax.flops import peak as peak_lib
from wamjax.flops.analytic import SequenceShape, forward_flops
from wamjax.flops.ledger import stage_step_count
from wamjax.flops.stage import train_step_flops
from wamjax.inference.policy_step import PolicyShapes, policy_step
from wamjax.models import clip as clip_lib
from wamjax.models import vae as vae_lib
from wamjax.models.attention import resolve_attention
from wamjax.models.wam import WorldActionModel, example_inputs
from wamjax.parallel.mesh import MESH_AXES, batch_sharding, logical_rules, make_mesh, replicated
from wamjax.stages import PolicySpec, StageSpec, policy_spec, stage_spec
from wamjax.train.setup import jit_train_step, state_layout, unbox_plain
from wamjax.train.stage_step import build_stage_step, frozen_params

# Generations libtpu describes, with the chip configuration each is compiled for (v4 and v5p: one device per
# chip, both TensorCores, as they run in practice).
GENERATIONS: dict[str, dict[str, Any]] = {
    "v4": {"chip_config_name": "megacore"},
    "v5p": {},
    "v5e": {},
    "v6e": {},
}
# Cloud TPU slice names -> topology (v4/v5p count TensorCores, two per chip; v5e/v6e count chips).
TOPOLOGY_ALIASES: dict[str, str] = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8", "v5p-512": "v5p:4x8x8", "v5p-1024": "v5p:8x8x8",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8", "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}
_TOPOLOGY_RE = re.compile(r"^(v4|v5p|v5e|v6e):(\d+)x(\d+)(?:x(\d+))?$")
GIB = 2**30


class CompileCheckError(ValueError):
    """Bad input to the check: unknown topology, a mesh or batch that the topology cannot take."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice by name, its compile-target devices and its per-chip figures."""

    name: str  # canonical "gen:AxBxC"
    devices: tuple[Any, ...]
    device_kind: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float

    @property
    def chips(self) -> int:
        return len(self.devices)


def canonical_topology(name: str) -> tuple[str, str, tuple[int, ...]]:
    """(canonical name, generation, dims) of `v5p:4x4x4` or a slice name like `v5p-128`."""
    resolved = TOPOLOGY_ALIASES.get(name.strip().lower(), name.strip().lower())
    match = _TOPOLOGY_RE.match(resolved)
    if not match:
        raise CompileCheckError(
            f"--topology={name!r} is not a TPU topology; expected GEN:AxB[xC] with GEN in {sorted(GENERATIONS)} "
            f"(e.g. v5p:4x4x4, v6e:4x4) or a slice name in {sorted(TOPOLOGY_ALIASES)}"
        )
    gen = match.group(1)
    dims = tuple(int(d) for d in match.groups()[1:] if d is not None)
    if gen in ("v4", "v5p") and len(dims) != 3:
        raise CompileCheckError(f"--topology={name!r}: {gen} slices are 3-D (AxBxC), e.g. {gen}:2x2x1")
    if gen in ("v5e", "v6e") and len(dims) != 2:
        raise CompileCheckError(f"--topology={name!r}: {gen} slices are 2-D (AxB), e.g. {gen}:2x2")
    if min(dims) < 1:
        raise CompileCheckError(f"--topology={name!r}: every dimension must be at least 1")
    return f"{gen}:{'x'.join(map(str, dims))}", gen, dims


def get_topology(name: str) -> Topology:
    """The compile-target devices of a TPU topology, described by libtpu (no TPU needed)."""
    canonical, gen, dims = canonical_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise CompileCheckError("libtpu is not installed; it describes TPU topologies: pip install 'wamjax[tpu]'")
    from jax.experimental import topologies

    # Describing a topology opens no TPU, so several processes (a test and the CLI it starts, or a check beside
    # a run) may load libtpu at once; without this its lockfile lets only the first one in.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Hosts hold at most 2x2x1 chips; smaller slices are one host.
    bounds = (min(2, dims[0]), min(2, dims[1]), 1)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=canonical, chips_per_host_bounds=bounds, **GENERATIONS[gen]
        )
    except Exception as e:  # libtpu's own message names the problem; say which flag it came from
        raise CompileCheckError(f"--topology={name!r}: libtpu cannot describe {canonical}: {e}") from e
    devices = tuple(desc.devices)
    kind = str(devices[0].device_kind)
    hbm, peak, bandwidth = (peak_lib.hbm_bytes_per_device(kind), peak_lib.peak_flops_per_device(kind),
                            peak_lib.hbm_bandwidth_per_device(kind))
    if hbm is None or peak is None or bandwidth is None:
        raise CompileCheckError(f"--topology={name!r}: no HBM/peak figures for device kind {kind!r} in "
                                "wamjax.flops.peak")
    return Topology(canonical, devices, kind, hbm, peak, bandwidth)


# ----------------------------------------------------------------------------------------------------
# What is compiled.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Per-device figures of one compiled program, or of one the TPU compiler refused for lack of HBM."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    host_bytes: int  # arguments, outputs and temporaries placed in host memory (offloaded)
    flops: float  # XLA's count per device (loop bodies once)
    bytes_accessed: float
    compile_s: float
    out_of_memory: str = ""  # the compiler's message when it refused the program; "" when it compiled

    @property
    def total_bytes(self) -> int:
        """HBM one device needs: arguments + outputs not aliased to (donated) arguments + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


# The TPU compiler's refusal names the bytes it needed, e.g. "the total memory required for HLO temporaries
# (26.43G) exceeds available HBM (15.75G)"; its G/M/K are binary units.
_OOM_RE = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a compile error is the compiler refusing a program that does not fit HBM."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def per_device_argument_bytes(args: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (None leaves are absent)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(args))


def _compile(jitted: Any, *args: Any) -> Compiled:
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        match = _OOM_RE.search(str(e))
        temp = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0
        return Compiled(per_device_argument_bytes(args), 0, 0, temp, 0, 0, 0.0, 0.0,
                        time.perf_counter() - start, out_of_memory=str(e).strip())
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    cost = cost or {}
    return Compiled(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        host_bytes=int(mem.host_argument_size_in_bytes + mem.host_output_size_in_bytes
                       + mem.host_temp_size_in_bytes - mem.host_alias_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        compile_s=seconds,
    )


def resolve_stage(config: ml_collections.ConfigDict, stage: str | None) -> str:
    """The stage to compile: `stage`, else the config's (the first one when it runs `all`)."""
    try:
        return stages_lib.resolve_stage(config, stage)
    except KeyError as e:
        raise CompileCheckError(f"--stage: {e.args[0]}") from None


def abstract_batch(spec: StageSpec, mesh: jax.sharding.Mesh, rules: Any,
                   latents: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the loop feeds the step (`parallel.placement.device_batch` of the batch contract), abstract:
    `latents` (a latents cache) or uint8 `frames` (with a views axis for the tokens layout), sharded along the batch
    axis."""
    cfg, clip = spec.model, spec.clip
    b, t = clip.batch_size, clip.num_frames
    h, w = clip.resolution
    batch_ways = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    if b % batch_ways:
        raise CompileCheckError(
            f"data.batch_size={b} (global) is not divisible by the mesh's batch axes data x fsdp = {batch_ways} "
            f"(mesh {dict(mesh.shape)}); use a multiple of {batch_ways} or move devices to mesh.tensor/sequence"
        )
    views = () if spec.views is None else (spec.views,)
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "frame_mask": ((b, t), jnp.bool_),
        "actions": ((b, clip.actions, cfg.action_dim), jnp.float32),
        "action_mask": ((b, clip.actions), jnp.bool_),
        "has_actions": ((b,), jnp.bool_),
        "proprio": ((b, *(() if clip.states is None else (clip.states,)), clip.proprio_dim), jnp.float32),
        "dataset_index": ((b,), jnp.int32),
        "text_embeddings": ((b, spec.text_length, cfg.text_dim), jnp.float32),
    }
    if latents:
        f, lh, lw, z = spec.vae_latent_shape
        shapes["latents"] = ((b, f, *views, lh, lw, z), jnp.float32)
    else:
        shapes["frames"] = ((b, t, *views, h, w, 3), jnp.uint8)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, rules, len(s))) for k, (s, d) in
            shapes.items()}


def _abstract_vae_params(spec: StageSpec | PolicySpec, mesh: jax.sharding.Mesh) -> Any:
    shapes = jax.eval_shape(lambda: vae_lib.init_vae_params(spec.vae, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), shapes)


def _abstract_image_encoder_params(spec: StageSpec, mesh: jax.sharding.Mesh) -> Any:
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated(mesh))
            for k, shape in clip_lib.param_shapes(spec.image_encoder).items()}


def compile_train_step(config: ml_collections.ConfigDict, stage: str, mesh: jax.sharding.Mesh, *,
                       latents: bool | None = None) -> Compiled:
    """Compiles the loop's train step of `stage` on `mesh` for abstract arguments; `latents` overrides whether
    the batch carries cached latents (default: as the config says)."""
    step, *args = abstract_train_step(config, stage, mesh, latents=latents)
    with _mesh_context(config, mesh):
        return _compile(step, *args)


def _mesh_context(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> contextlib.ExitStack:
    """The mesh and logical-axis rules a step is traced under (its activation constraints name logical axes)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(list(logical_rules(config.mesh.rules))))
    return stack


def abstract_train_step(config: ml_collections.ConfigDict, stage: str, mesh: jax.sharding.Mesh, *,
                        latents: bool | None = None) -> tuple[Any, ...]:
    """(jitted step, abstract state, abstract batch, abstract frozen parameters): the loop's step of `stage` as
    `train.stage_step.build_stage_step` builds it, with the schedule over the steps the stage's budget buys."""
    try:
        spec = stage_spec(config, stage)
    except (KeyError, ValueError) as e:
        raise CompileCheckError(str(e.args[0]) if e.args else str(e)) from e
    rules = logical_rules(config.mesh.rules)
    use_latents = spec.uses_latents_cache if latents is None else latents
    total_steps = stage_step_count(spec.steps, spec.budget_flops, train_step_flops(spec).train_per_step)
    with _mesh_context(config, mesh):
        batch = abstract_batch(spec, mesh, rules, use_latents)
        try:
            built = build_stage_step(spec, mesh, rules, total_steps=total_steps)
        except ValueError as e:
            raise CompileCheckError(str(e)) from e
        abstract_state, shardings = state_layout(built.init_boxed, mesh, rules)
        vae_params = None if use_latents else _abstract_vae_params(spec, mesh)
        image_params = None if spec.image_encoder is None else _abstract_image_encoder_params(spec, mesh)
        train_step = jit_train_step(built.step_fn, shardings)
        return train_step, abstract_state, batch, frozen_params(vae_params, image_params)


def compile_policy_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_steps: int) -> Compiled:
    """Compiles the policy's jitted call (`inference.policy_step.policy_step`: VAE encode of the context frame, then
    `num_steps` denoising steps of video and actions) for one observation, parameters laid out by the rules."""
    step, *args = abstract_policy_step(config, mesh, num_steps)
    with _mesh_context(config, mesh):
        return _compile(step, *args)


def abstract_policy_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_steps: int
                         ) -> tuple[Any, ...]:
    """(jitted policy call, its abstract arguments) for one observation (see `compile_policy_step`)."""
    spec = policy_spec(config)
    cfg = spec.model
    rules = logical_rules(config.mesh.rules)
    f, lh, lw, z = vae_lib.latent_shape(spec.vae, (1, spec.clip.num_frames, *spec.clip.resolution, 3))[1:]
    num_actions = spec.clip.actions
    shapes = PolicyShapes(cfg, spec.vae, SamplerOptions(num_steps=num_steps, shift=spec.shift),
                          future_frames=f - 1, num_actions=num_actions, stop_after_actions=True)
    example = jax.eval_shape(lambda: example_inputs(cfg, (f, lh, lw, z), spec.text_length, num_actions))
    h, w = spec.clip.resolution
    with _mesh_context(config, mesh):
        boxed = jax.eval_shape(lambda: WorldActionModel(cfg).init(
            jax.random.PRNGKey(0), **{k: jnp.zeros(e.shape, e.dtype) for k, e in example.items()})["params"])
        param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, list(rules))
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              unbox_plain(boxed), param_shardings)
        rep = replicated(mesh)
        args = (
            params,
            _abstract_vae_params(spec, mesh),
            jax.ShapeDtypeStruct((1, 1, h, w, 3), jnp.uint8, sharding=rep),
            jax.ShapeDtypeStruct((1, spec.text_length, cfg.text_dim), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((1, spec.clip.proprio_dim), jnp.float32, sharding=rep),
            jax.eval_shape(lambda: jax.random.key(0)),
        )
        return jax.jit(lambda *a: policy_step(shapes, *a)), *args


def _unrolled(config: ml_collections.ConfigDict, layers: int) -> ml_collections.ConfigDict:
    out = copy.deepcopy(config)
    with out.unlocked():
        out.model.num_layers = layers
        out.model.scan_layers = False
    return out


# ----------------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------------


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

    @property
    def fits(self) -> bool:
        return not self.compiled.out_of_memory and self.compiled.total_bytes <= self.topology.hbm_bytes

    @property
    def flop_ratio(self) -> float | None:
        return None if self.xla_flops is None else self.xla_flops / self.analytic_flops

    @property
    def step_time_bound(self) -> float:
        """Roofline lower bound on the step time: max(compute at peak, HBM traffic at full bandwidth). XLA's
        FLOPs are used unless they miss an opaque (Pallas) attention kernel; then the analytic count is."""
        use_xla = self.xla_flops is not None and not self.opaque_attention
        flops = self.xla_flops if use_xla else self.analytic_flops
        compute = flops / self.topology.chips / self.topology.peak_flops
        memory = (self.xla_bytes_accessed or 0.0) / self.topology.hbm_bandwidth
        return max(compute, memory)

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
            "opaque_attention": self.opaque_attention,
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
        lines.append(f"roofline          step >= {self.step_time_bound * 1e3:.2f} ms "
                     f"(peak {t.peak_flops / 1e12:.0f} TFLOP/s, HBM {t.hbm_bandwidth / 1e9:.0f} GB/s per chip); "
                     f"MFU <= {100 * self.mfu_bound:.1f}%{bound}")
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


def check(config: ml_collections.ConfigDict, topology: str, *, what: str = "train", stage: str | None = None,
          xla_flops: bool = True, vae_delta: bool = True, num_steps: int = 4,
          log: Callable[[str], None] = lambda _: None) -> Report:
    """Compiles the configured step for `topology` and measures it (see the module docstring)."""
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
        if not spec.joint:
            raise CompileCheckError(f"--what=inference needs a joint (action) stage; stage {stage} is "
                                    f"{spec.mode!r}: pass --stage=action_tune")
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
    compiled = compile_train_step(config, stage, mesh)
    # Hardware FLOPs (the TPU kernel at its block sizes, remat) bound the step time; model FLOPs give the MFU.
    step = train_step_flops(spec, pad_to_multiple=mesh_sizes["sequence"], backend="tpu")
    vae_in_step = not spec.uses_latents_cache
    analytic = step.hardware_per_step + (step.frozen_per_step if vae_in_step else 0.0)
    xla_total, bytes_accessed = None, None
    if xla_flops:
        if cfg.scan_layers and cfg.num_layers > 1:
            log("counting XLA FLOPs: the step with 1 and 2 unrolled layers ...")
            one = compile_train_step(_unrolled(config, 1), stage, mesh)
            two = compile_train_step(_unrolled(config, 2), stage, mesh)
            per_chip = one.flops + (cfg.num_layers - 1) * (two.flops - one.flops)
            bytes_accessed = one.bytes_accessed + (cfg.num_layers - 1) * (two.bytes_accessed - one.bytes_accessed)
            xla_total = None if (one.out_of_memory or two.out_of_memory) else per_chip * topo.chips
        elif not compiled.out_of_memory:
            per_chip, bytes_accessed = compiled.flops, compiled.bytes_accessed
            xla_total = per_chip * topo.chips
    if xla_total is not None and spec.microbatches > 1:
        # The micro-batches are a scan whose body XLA counts once (the optimizer update outside it is then
        # counted `microbatches` times too: a small excess).
        xla_total *= spec.microbatches
        bytes_accessed = None if bytes_accessed is None else bytes_accessed * spec.microbatches
    delta = None
    # An image-conditioned step encodes its conditioning from the frames: it has no latents-only variant.
    if vae_in_step and vae_delta and spec.image_encoder is None:
        log("compiling the same step on cached latents, for the VAE's share ...")
        delta = compile_train_step(config, stage, mesh, latents=True)
    kernel = resolve_attention(cfg.attention, "tpu", cfg.dtype)
    return Report(what, stage, topo, mesh_sizes, spec.clip.batch_size, compiled, analytic_flops=analytic,
                  model_flops=step.train_per_step, xla_flops=xla_total, xla_bytes_accessed=bytes_accessed,
                  vae_in_step=vae_in_step, vae_delta=delta, opaque_attention=kernel == "splash")


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
                       vae_delta=f.vae_delta, num_steps=f.num_steps,
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
    flags.DEFINE_integer("num_steps", 4, "Denoising steps of the policy call (--what=inference).")
    flags.mark_flags_as_required(["topology"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
