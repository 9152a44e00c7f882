"""optax AdamW with warmup + cosine decay, gradient clipping, frozen-parameter masks and non-finite skipping."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wamjax.stages import TRAINABLE_CHOICES, is_trainable  # noqa: F401  (re-exported)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, min_ratio: float) -> optax.Schedule:
    """Linear warmup to `peak`, then cosine decay to `peak * min_ratio` at `total_steps`."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else peak,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=peak * min_ratio,
    )


def path_name(path: tuple) -> str:
    """A '/'-joined name of a pytree path, keeping dict keys and attribute names only."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            parts.append(key.name)
    return "/".join(parts)


def trainable_labels(params: Any, trainable: str) -> Any:
    """A pytree of 'train' / 'freeze' labels with the structure of `params`."""
    # Logical-axis boxes count as leaves, so labels match both boxed (init) and plain (update) trees.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if is_trainable(path_name(path), trainable) else "freeze",
        params,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


class SpikeGuardState(NamedTuple):
    """Running mean of the loss over the updates taken, and what the guard skipped."""

    mean: jax.Array  # bias-corrected on read: mean / (1 - decay ** taken)
    taken: jax.Array  # updates whose loss entered the mean
    in_a_row: jax.Array  # consecutive skipped updates
    skipped: jax.Array  # updates skipped so far (this stage)
    last_skipped: jax.Array  # whether the latest update was skipped
    inner: optax.OptState


def skip_on_spike(inner: optax.GradientTransformation, factor: float, window: int
                  ) -> optax.GradientTransformationExtraArgs:
    """`inner`, except that an update whose `loss` (an extra argument) exceeds `factor` x the running mean of the
    losses of the updates taken is skipped: zero updates, `inner`'s state kept.

    The mean is an exponential average over about `window` updates; the guard acts once `window` updates
    entered it. After `window` skips in a row the loss is taken as the new level (the update applies and the
    mean restarts from it), so a lasting shift in the loss cannot stop training.
    """
    if factor <= 1.0:
        raise ValueError(f"optim.skip_step_on_spike={factor}; expected 0 (off) or a multiple > 1 of the mean loss")
    if window < 1:
        raise ValueError(f"optim.spike_window_steps={window}; expected >= 1")
    decay = 1.0 - 1.0 / window
    inner = optax.with_extra_args_support(inner)

    def init(params):
        zero = jnp.zeros([], jnp.int32)
        return SpikeGuardState(jnp.zeros([], jnp.float32), zero, zero, zero, jnp.zeros([], jnp.bool_),
                               inner.init(params))

    def update(updates, state, params=None, *, loss, **extra_args):
        loss = jnp.asarray(loss, jnp.float32)
        mean = state.mean / jnp.maximum(1.0 - decay ** state.taken.astype(jnp.float32), 1e-12)
        reset = state.in_a_row >= window
        skip = (state.taken >= window) & (loss > factor * mean) & jnp.logical_not(reset) & jnp.isfinite(loss)
        new_updates, new_inner = inner.update(updates, state.inner, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(skip, o, n), new_inner, state.inner)
        restart = jnp.where(reset, 0.0, state.mean)
        taken = jnp.where(reset, 0, state.taken)
        new_mean = jnp.where(skip, state.mean, decay * restart + (1.0 - decay) * loss)
        new_taken = jnp.where(skip, state.taken, taken + 1)
        return new_updates, SpikeGuardState(
            new_mean, new_taken, jnp.where(skip, state.in_a_row + 1, 0), state.skipped + skip.astype(jnp.int32),
            skip, new_inner)

    return optax.GradientTransformationExtraArgs(init, update)


def spike_skipped(opt_state: optax.OptState) -> tuple[jax.Array, jax.Array] | None:
    """(whether the latest update was skipped as a loss spike, skips so far) of the guard's state, or None when
    the optimizer has no guard."""
    for state in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, SpikeGuardState)):
        if isinstance(state, SpikeGuardState):
            return state.last_skipped, state.skipped
    return None


def make_optimizer(
    optim: ml_collections.ConfigDict, *, learning_rate: float, warmup_steps: int, total_steps: int, trainable: str
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The stage's optimizer and its schedule. Frozen parameters get zero updates and no optimizer moments."""
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps, optim.min_lr_ratio)
    adamw = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay),
    )
    tx = adamw
    if trainable != "all":
        tx = optax.multi_transform(
            {"train": adamw, "freeze": optax.set_to_zero()}, lambda p: trainable_labels(p, trainable)
        )
    spike = float(optim.get("skip_step_on_spike", 0.0))
    if spike:
        tx = skip_on_spike(tx, spike, int(optim.get("spike_window_steps", 20)))
    # The host loop stops the run after `max_consecutive_nonfinite`; optax only has to skip the bad updates.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
    return tx, schedule
