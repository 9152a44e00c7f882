"""Reading a whole checkpointed train state back, for tests that inspect what the trainer saved."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from wamjax.checkpoint.manager import saved_state_tree
from wamjax.paths import PathLike, as_path


def restore_state_tree(step_path: PathLike, abstract_state: Any = None) -> Any:
    """The whole `state` item of a step (optimizer included) restored onto `abstract_state`'s shardings, or as
    host numpy arrays."""
    tree = saved_state_tree(step_path)  # raises naming the step when it has no state item
    path = as_path(step_path) / "state"
    if abstract_state is None:
        is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree, is_leaf=is_array)
        return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return ocp.StandardCheckpointer().restore(path, abstract_state)
