"""optax AdamW with warmup + cosine decay, gradient clipping, frozen-parameter masks and non-finite skipping."""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

TRAINABLE_CHOICES = ("all", "actions", "actions+blocks")


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


def is_trainable(name: str, trainable: str) -> bool:
    """Whether the parameter called `name` trains under the stage's `trainable` setting."""
    if trainable == "all":
        return True
    if trainable == "actions":
        return name.startswith("actions/")
    if trainable == "actions+blocks":
        return name.startswith("actions/") or name.startswith("blocks/")
    if trainable.startswith("regex:"):
        return re.search(trainable[len("regex:") :], name) is not None
    raise ValueError(f"stages.<stage>.trainable={trainable!r}; expected one of {TRAINABLE_CHOICES} or 'regex:...'")


def trainable_labels(params: Any, trainable: str) -> Any:
    """A pytree of 'train' / 'freeze' labels with the structure of `params`."""
    # Logical-axis boxes count as leaves, so labels match both boxed (init) and plain (update) trees.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if is_trainable(path_name(path), trainable) else "freeze",
        params,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


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
    # The host loop stops the run after `max_consecutive_nonfinite`; optax only has to skip the bad updates.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**30)
    return tx, schedule
