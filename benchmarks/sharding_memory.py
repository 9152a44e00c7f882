"""Per-device parameter + optimizer bytes under FSDP, and the compiled per-device peak memory of a train step.

  python benchmarks/sharding_memory.py                      # wan1.3b and wan14b at fsdp 1, 8, 64, 256; tiny peak
  python benchmarks/sharding_memory.py --sizes=wan14b --fsdp=1,16,512

The FSDP table is abstract evaluation only (jax.eval_shape of the train state and the rule table's shard
shapes on an AbstractMesh): nothing is allocated, so any mesh size can be asked for on a laptop. It asserts
that FSDP divides the per-device bytes by N to within 5%. The peak-memory line compiles the tiny model's
train step on the local devices (fsdp over all of them) and reads XLA's memory analysis.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import app, flags

from wamjax import config_files

_SIZES = flags.DEFINE_list("sizes", ["wan1.3b", "wan14b"], "Model sizes for the FSDP table.")
_FSDP = flags.DEFINE_list("fsdp", ["1", "8", "64", "256"], "FSDP axis sizes (data = tensor = sequence = 1).")
_STAGE = flags.DEFINE_string("stage", "video_pretrain", "Stage whose parameters and optimizer are counted.")
_PEAK_SIZE = flags.DEFINE_string("peak_size", "tiny", "Model size compiled for the peak-memory line; '' skips.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.05, "Allowed relative deviation from 1/N scaling.")



def load_config(size: str, stage: str):
    """configs/wam.py for the size and stage."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "wam.py")
    return config_files.get_config(f"{path}:size={size},stage={stage}")


def abstract_state_and_step(config, stage: str, pad_to_multiple: int = 1):
    """(boxed abstract train state, init_boxed, step function, model config, latent shape) for a run config."""
    from wamjax.models import vae as vae_lib
    from wamjax.models.config import model_config_from_run
    from wamjax.models.wam import WorldActionModel, example_inputs
    from wamjax.train.optimizer import make_optimizer
    from wamjax.train.setup import boxed_init_fn
    from wamjax.train.step import StepSpec, make_train_step

    cfg = model_config_from_run(config)
    stage_cfg = config.stages[stage]
    vae_cfg = vae_lib.vae_config_for(config.vae.size)
    h, w = config.data.resolution
    latent_shape = tuple(vae_lib.latent_shape(vae_cfg, (1, config.data.num_frames, h, w, 3))[1:])
    num_actions = config.data.num_frames - 1 if stage_cfg.mode == "joint" else 0
    tx, schedule = make_optimizer(config.optim, learning_rate=config.optim.learning_rate,
                                  warmup_steps=config.optim.warmup_steps, total_steps=int(config.train.steps),
                                  trainable=stage_cfg.trainable)
    model = WorldActionModel(cfg, pad_to_multiple=pad_to_multiple)
    example = example_inputs(cfg, latent_shape, config.text.max_length, num_actions)
    init_boxed = boxed_init_fn(model, example, tx, use_ema=config.optim.ema_decay > 0)
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    spec = StepSpec(model=cfg, mode=stage_cfg.mode, clean_context_frames=int(stage_cfg.clean_context_frames),
                    vae=vae_cfg, pad_to_multiple=pad_to_multiple)
    step_fn = make_train_step(spec, config.diffusion, tx, schedule, config.optim.ema_decay)
    return abstract_boxed, init_boxed, step_fn, cfg, latent_shape, num_actions


def bytes_per_device(abstract_boxed, mesh_sizes: dict[str, int], rules) -> tuple[int, int, int]:
    """(parameter bytes, optimizer bytes, bytes in all) one device holds, from shard shapes on an AbstractMesh."""
    from wamjax.parallel.mesh import MESH_AXES
    from wamjax.train.setup import state_shardings, unbox_plain

    mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in MESH_AXES), MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    shardings = state_shardings(abstract_boxed, mesh, rules)
    plain = unbox_plain(abstract_boxed)

    def total(tree, tree_shardings) -> int:
        leaves = jax.tree.leaves(tree)
        leaf_shardings = jax.tree.leaves(tree_shardings,
                                         is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                   for a, s in zip(leaves, leaf_shardings, strict=True))

    params = total(plain.params, shardings.params)
    opt = total(plain.opt_state, shardings.opt_state)
    everything = total(plain, shardings)
    return params, opt, everything


def fsdp_table(sizes: list[str], fsdp_sizes: list[int], stage: str, tolerance: float) -> list[str]:
    """Prints per-device bytes per (size, fsdp); returns the scaling violations (empty when FSDP scales as 1/N)."""
    from wamjax.models.wam import count_params
    from wamjax.parallel.mesh import logical_rules
    from wamjax.train.setup import unbox_plain

    violations = []
    print(f"{'size':<8} {'fsdp':>5} {'params/device':>14} {'optimizer/device':>17} {'state/device':>13} "
          f"{'x fsdp / fsdp=1':>16}")
    for size in sizes:
        config = load_config(size, stage)
        rules = logical_rules(config.mesh.rules)
        abstract_boxed = abstract_state_and_step(config, stage)[0]
        num_params = count_params(unbox_plain(abstract_boxed).params)
        base = None
        for n in fsdp_sizes:
            params, opt, everything = bytes_per_device(abstract_boxed, {"data": 1, "fsdp": n, "tensor": 1,
                                                                        "sequence": 1}, rules)
            base = base or params + opt
            scaled = (params + opt) * n / base
            print(f"{size:<8} {n:>5} {_gib(params):>14} {_gib(opt):>17} {_gib(everything):>13} {scaled:>16.4f}")
            if abs(scaled - 1.0) > tolerance:
                violations.append(f"{size} fsdp={n}: per-device params+optimizer x N is {scaled:.4f} of fsdp=1's "
                                  f"(expected 1 +- {tolerance})")
        print(f"{size:<8} {num_params / 1e9:.3f}B parameters")
    return violations


def compiled_peak(size: str, stage: str) -> None:
    """Compiles the train step of `size` with fsdp over the local devices and prints XLA's memory analysis."""
    import flax.linen as nn

    from wamjax.parallel.mesh import batch_sharding, logical_rules, make_mesh
    from wamjax.train.setup import jit_train_step, sharded_init

    config = load_config(size, stage)
    mesh = make_mesh(config.mesh)  # fsdp = -1: every local device
    rules = logical_rules(config.mesh.rules)
    _, init_boxed, step_fn, cfg, latent_shape, num_actions = abstract_state_and_step(
        config, stage, pad_to_multiple=mesh.shape["sequence"])
    b = int(config.data.batch_size)
    batch_shapes = {"latents": ((b, *latent_shape), np.float32),
                    "text_embeddings": ((b, config.text.max_length, cfg.text_dim), np.float32)}
    if num_actions:
        batch_shapes.update(actions=((b, num_actions, cfg.action_dim), np.float32),
                            proprio=((b, cfg.proprio_dim), np.float32), action_mask=((b, num_actions), np.bool_))
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        init = sharded_init(init_boxed, mesh, rules)
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, rules, len(shape)))
                 for k, (shape, dtype) in batch_shapes.items()}
        compiled = jit_train_step(step_fn, init.shardings).lower(init.abstract_state, batch, None).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        print(f"{size}: this backend ({jax.default_backend()}) gives no memory analysis")
        return
    # Live at once in the worst case: inputs, outputs not written in place of a donated input, temporaries.
    bound = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    xla_peak = getattr(stats, "peak_memory_in_bytes", 0)
    print(f"\ncompiled train step, size={size} stage={stage}, batch {b} on mesh {dict(mesh.shape)} "
          f"({jax.default_backend()}), per device:")
    print(f"  arguments {_mib(stats.argument_size_in_bytes)}  outputs {_mib(stats.output_size_in_bytes)}  "
          f"aliased (donated) {_mib(stats.alias_size_in_bytes)}  temporaries {_mib(stats.temp_size_in_bytes)}  "
          f"code {_mib(stats.generated_code_size_in_bytes)}")
    print(f"  peak: arguments + outputs - aliased + temporaries = {_mib(bound)}"
          + (f"; XLA's buffer-assignment peak {_mib(xla_peak)}" if xla_peak else ""))


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv) -> None:
    del argv
    violations = fsdp_table(list(_SIZES.value), [int(n) for n in _FSDP.value], _STAGE.value, _TOLERANCE.value)
    if _PEAK_SIZE.value:
        compiled_peak(_PEAK_SIZE.value, _STAGE.value)
    if violations:
        raise SystemExit("FSDP does not scale per-device bytes as 1/N:\n  " + "\n  ".join(violations))
    print(f"\nFSDP scales per-device parameter + optimizer bytes as 1/N within {_TOLERANCE.value:.0%}.")


if __name__ == "__main__":
    app.run(main)
