"""The steps `wamjax.compile_check` compiles for a TPU topology on a CPU: the topology's devices from libtpu, the
loop's own jitted train step and the policy's denoising call on abstract, sharded arguments, and what XLA
reports of each compile."""


from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wamjax import stages as stages_lib
from wamjax.diffusion.sampler import SamplerOptions
from wamjax.flops import peak as peak_lib
from wamjax.flops.collectives import collective_traffic
from wamjax.flops.ledger import stage_step_count
from wamjax.flops.stage import train_step_flops
from wamjax.inference import kv_cache
from wamjax.inference.kv_cache import ChunkGeometry
from wamjax.inference.policy_step import PolicyShapes, policy_step
from wamjax.models import clip as clip_lib
from wamjax.models import vae as vae_lib
from wamjax.models.wam import WorldActionModel, example_inputs
from wamjax.parallel.mesh import batch_sharding, logical_rules, replicated
from wamjax.stages import PolicySpec, StageSpec, policy_spec, stage_spec
from wamjax.train import compiled_step
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
    ici_bandwidth: float | None = None  # bidirectional, all links, per chip; None when unknown

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
    return Topology(canonical, devices, kind, hbm, peak, bandwidth, peak_lib.ici_bandwidth_per_device(kind))


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
    collectives: dict[str, float] = dataclasses.field(default_factory=dict)  # kind -> bytes per chip (loops once)
    executable: Any = dataclasses.field(default=None, repr=False, compare=False)  # the jax.stages.Compiled

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


def num_devices(args: Any) -> int:
    """Devices a program over these sharded arguments runs on (1 when none is sharded)."""
    return max((len(a.sharding.device_set) for a in jax.tree.leaves(args) if getattr(a, "sharding", None)),
               default=1)


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
        collectives=collective_traffic(compiled.as_text(), num_devices(args)),
        executable=compiled,
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
        "action_dim_mask": ((b, cfg.action_dim), jnp.bool_),
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
                       latents: bool | None = None, stage_start_step: int = 0) -> Compiled:
    """Compiles the loop's train step of `stage` on `mesh` for abstract arguments; `latents` overrides whether
    the batch carries cached latents (default: as the config says)."""
    step, *args = abstract_train_step(config, stage, mesh, latents=latents, stage_start_step=stage_start_step)
    with _mesh_context(config, mesh):
        return _compile(step, *args)


def stage_total_steps(spec: StageSpec) -> int:
    """The steps a stage's schedule runs over: its configured steps, or what its FLOP budget buys of them."""
    return stage_step_count(spec.steps, spec.budget_flops, train_step_flops(spec).train_per_step)


def save_train_step(config: ml_collections.ConfigDict, stage: str, mesh: jax.sharding.Mesh, compiled: Compiled,
                    path: str, *, stage_start_step: int = 0) -> None:
    """Writes `compiled` (this stage's train step on `mesh`) as a `train.compiled_step` file a job loads."""
    _, *args = abstract_train_step(config, stage, mesh, stage_start_step=stage_start_step)
    expected = compiled_step.fingerprint(config, stage, mesh, tuple(args),
                                         total_steps=stage_total_steps(stage_spec(config, stage)),
                                         stage_start_step=stage_start_step)
    compiled_step.save(path, compiled.executable, expected)


def _mesh_context(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> contextlib.ExitStack:
    """The mesh and logical-axis rules a step is traced under (its activation constraints name logical axes)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(list(logical_rules(config.mesh.rules))))
    return stack


def abstract_train_step(config: ml_collections.ConfigDict, stage: str, mesh: jax.sharding.Mesh, *,
                        latents: bool | None = None, stage_start_step: int = 0) -> tuple[Any, ...]:
    """(jitted step, abstract state, abstract batch, abstract frozen parameters): the loop's step of `stage` as
    `train.stage_step.build_stage_step` builds it, with the schedule over the steps the stage's budget buys and
    its counters starting at `stage_start_step` (0 for a job's first stage)."""
    try:
        spec = stage_spec(config, stage)
    except (KeyError, ValueError) as e:
        raise CompileCheckError(str(e.args[0]) if e.args else str(e)) from e
    rules = logical_rules(config.mesh.rules)
    use_latents = spec.uses_latents_cache if latents is None else latents
    total_steps = stage_total_steps(spec)
    with _mesh_context(config, mesh):
        batch = abstract_batch(spec, mesh, rules, use_latents)
        try:
            built = build_stage_step(spec, mesh, rules, total_steps=total_steps, stage_start_step=stage_start_step)
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


def _abstract_model_params(cfg: Any, example: dict[str, Any], mesh: jax.sharding.Mesh, rules: Any) -> Any:
    """The model's parameters as ShapeDtypeStructs laid out by the rules (traced from `example` inputs)."""
    boxed = jax.eval_shape(lambda: WorldActionModel(cfg).init(
        jax.random.PRNGKey(0), **{k: jnp.zeros(e.shape, e.dtype) for k, e in example.items()})["params"])
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, list(rules))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox_plain(boxed),
                        param_shardings)


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
        params = _abstract_model_params(cfg, example, mesh, rules)
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


def inference_options(config: ml_collections.ConfigDict, num_steps: int | None = None) -> SamplerOptions:
    """The run's sampler settings (`SamplerOptions(**config.inference)`, the Flash configs' fast path), else
    `num_steps` plain steps with the run's shift; `num_steps` also overrides the configured count."""
    values = dict(config.get("inference", None) or {})
    values.setdefault("shift", float(config.diffusion.shift))
    if num_steps is not None or "num_steps" not in values:
        values["num_steps"] = 4 if num_steps is None else int(num_steps)
    if "step_cache_mask" in values and values["step_cache_mask"] is not None:
        values["step_cache_mask"] = tuple(bool(m) for m in values["step_cache_mask"])
    try:
        return SamplerOptions(**values)
    except (TypeError, ValueError) as e:
        raise CompileCheckError(f"inference.*: {e}") from e


def chunk_geometry(spec: PolicySpec, max_chunks: int | None = None) -> ChunkGeometry:
    """The KV-cache geometry a policy rolls out with: the trained clip's chunks (the session's default)."""
    cfg = spec.model
    f, lh, lw = vae_lib.latent_shape(spec.vae, (1, spec.clip.num_frames, *spec.clip.resolution, 3))[1:4]
    frames_per_chunk = max(cfg.chunk_latent_frames, 1)
    if max_chunks is None:
        max_chunks = (f - 1) // frames_per_chunk
    return ChunkGeometry.for_model(cfg, (lh, lw), max_chunks, with_proprio=spec.clip.proprio_dim > 0,
                                   views=spec.views, proprio_per_chunk=spec.clip.states is not None)


def abstract_chunk_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, options: SamplerOptions, *,
                        forward_only: bool = False) -> tuple[Any, ...]:
    """(jitted KV-cached chunk call, its abstract arguments) for one observation: the policy's last chunk of the
    clip, denoised against a cache holding the context and every earlier chunk (`kv_cache.generate_chunk`), or,
    with `forward_only`, one model evaluation of it (`kv_cache.chunk_velocity`, what each denoising iteration
    runs)."""
    spec = policy_spec(config)
    cfg = spec.model
    if cfg.attention_layout != "chunk_causal":
        raise CompileCheckError(f"model.attention_layout={cfg.attention_layout!r}: the KV-cached chunk needs "
                                "'chunk_causal'")
    geometry = chunk_geometry(spec)
    rules = logical_rules(config.mesh.rules)
    z = cfg.out_channels
    example = jax.eval_shape(lambda: example_inputs(cfg, (*geometry.latent_shape(1 + geometry.frames_per_chunk, z),),
                                                    spec.text_length, geometry.actions_per_chunk))
    with _mesh_context(config, mesh):
        params = _abstract_model_params(cfg, example, mesh, rules)
        rep = replicated(mesh)

        def arg(shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

        proprio = arg((1, spec.clip.proprio_dim)) if geometry.with_proprio else None
        text = arg((1, spec.text_length, cfg.text_dim))
        context = arg((1, *geometry.latent_shape(1, z)))
        state = jax.eval_shape(lambda p, c, t, pr: kv_cache.start_rollout(cfg, geometry, options, p, c, t, pr),
                               params, context, text, proprio)
        # The newest chunk reads a cache holding every earlier one (the compiled program is the same for any
        # count: attention runs over the cache's capacity, masked to what is written). Keys and values lie as the
        # batch (each CFG branch's on its own devices) and the heads do.
        cache_sharding = nn.logical_to_mesh_sharding(
            jax.sharding.PartitionSpec("layers", "batch", "kv_length", "heads", "kv"), mesh, list(rules))
        cache = state.cache._replace(
            keys=jax.ShapeDtypeStruct(state.cache.keys.shape, state.cache.keys.dtype, sharding=cache_sharding),
            values=jax.ShapeDtypeStruct(state.cache.values.shape, state.cache.values.dtype, sharding=cache_sharding),
            length=arg((), jnp.int32))
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), state._replace(
            cache=None))._replace(cache=cache)
        video = arg((1, *geometry.latent_shape(geometry.frames_per_chunk, z)))
        actions = arg((1, geometry.actions_per_chunk, cfg.action_dim))
        chunk_proprio = proprio if geometry.proprio_per_chunk else None
        if forward_only:
            def forward(p, st, v, a, pr):
                index = jnp.asarray(geometry.max_chunks, jnp.int32)
                return kv_cache.chunk_velocity(cfg, geometry, options, p, st, index, v, a, jnp.float32(0.5),
                                               jnp.float32(0.5), pr)
            return jax.jit(forward), params, state, video, actions, chunk_proprio
        return (jax.jit(lambda p, st, v, a, pr: kv_cache.generate_chunk(cfg, geometry, options, p, st, v, a,
                                                                         proprio=pr)),
                params, state, video, actions, chunk_proprio)


def compile_chunk_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, options: SamplerOptions, *,
                       forward_only: bool = False) -> Compiled:
    """Compiles `abstract_chunk_step` for the mesh's devices."""
    with _mesh_context(config, mesh):
        step, *args = abstract_chunk_step(config, mesh, options, forward_only=forward_only)
        return _compile(step, *args)


def unrolled(config: ml_collections.ConfigDict, layers: int) -> ml_collections.ConfigDict:
    out = copy.deepcopy(config)
    with out.unlocked():
        out.model.num_layers = layers
        out.model.scan_layers = False
    return out


# ----------------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------------
