"""Sharded train-state creation and the jitted step, shared by the loop, the tests and the benchmarks.

Call the returned functions under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`: the model's
activation constraints name logical axes, which only resolve inside those contexts.

Nothing here runs an operation eagerly: the layout (shardings and abstract state) comes from abstract
evaluation alone, so it can be computed for an AbstractMesh or a mesh of TPU topology devices that this
process cannot run anything on (`wamjax.compile_check`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from wamjax.train.step import TrainState


@dataclasses.dataclass(frozen=True)
class ShardedInit:
    """How a train state is laid out on a mesh, and a jitted function that creates it already sharded."""

    abstract_state: TrainState  # ShapeDtypeStructs carrying their target shardings (for restore)
    shardings: TrainState  # NamedSharding per leaf
    init: Callable[[jax.Array], TrainState]  # rng -> state, every leaf created directly in its shards


def boxed_init_fn(
    model: nn.Module, example: Mapping[str, jax.Array | jax.ShapeDtypeStruct | None], tx: optax.GradientTransformation,
    use_ema: bool,
) -> Callable[[jax.Array], TrainState]:
    """rng -> TrainState whose params (and optimizer moments) still carry their logical-axis boxes.

    `example` gives the model inputs' shapes and dtypes by argument name only (arrays or ShapeDtypeStructs; None
    for an absent optional input, as `example_inputs` gives them): initialization never reads their values.
    """
    shapes = {k: None if e is None else jax.ShapeDtypeStruct(e.shape, e.dtype) for k, e in example.items()}

    def init_boxed(rng: jax.Array) -> TrainState:
        inputs = {k: None if s is None else jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
        params = model.init(rng, **inputs)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=params if use_ema else None, rng=rng)

    return init_boxed


def unbox_plain(tree: Any) -> Any:
    """Removes logical-axis boxes without sharding constraints (for abstract values outside jit)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def state_shardings(abstract_boxed: Any, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                    rules: Sequence) -> Any:
    """NamedShardings of an abstract boxed state under the rule table; an AbstractMesh gives shard shapes only."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed), mesh, list(rules))


def abstract_rng() -> jax.ShapeDtypeStruct:
    """Shape and dtype of the raw PRNG key the train state carries (`jax.random.PRNGKey`), computed abstractly."""
    return jax.eval_shape(lambda: jax.random.PRNGKey(0))


def state_layout(
    init_boxed: Callable[[jax.Array], TrainState], mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    rules: Sequence,
) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings) of the train state on `mesh`, allocating nothing and running nothing.

    The abstract state's leaves are ShapeDtypeStructs carrying their NamedShardings: restore targets, or the
    arguments of an ahead-of-time compile. An AbstractMesh gives shard shapes (bytes per device) only.
    """
    abstract_boxed = jax.eval_shape(init_boxed, abstract_rng())
    shardings = state_shardings(abstract_boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox_plain(abstract_boxed), shardings
    )
    return abstract_state, shardings


def sharded_init(
    init_boxed: Callable[[jax.Array], TrainState], mesh: jax.sharding.Mesh, rules: Sequence, seed: int = 0,
    compiler_options: dict[str, Any] | None = None,
) -> ShardedInit:
    """The state's layout on `mesh` from abstract evaluation, and its jitted, sharded initializer.

    `seed` is unused (the caller passes the rng to `init`); kept so existing callers need no change.
    """
    del seed
    abstract_state, shardings = state_layout(init_boxed, mesh, rules)
    init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=shardings,
                   compiler_options=compiler_options)
    return ShardedInit(abstract_state=abstract_state, shardings=shardings, init=init)


def jit_train_step(
    step_fn: Callable, shardings: TrainState, donate: bool = True, compiler_options: dict[str, Any] | None = None
) -> Callable:
    """`step_fn(state, batch, vae_params)` jitted with the state pinned to its shardings in and out.

    Batches arrive as global arrays already sharded along the batch axis, so their in-sharding is taken
    from the arguments; metrics are scalars and left to the compiler. `compiler_options` are XLA debug
    options (tests use them to trade run time for compile time).
    """
    return jax.jit(step_fn, in_shardings=(shardings, None, None), out_shardings=(shardings, None),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
