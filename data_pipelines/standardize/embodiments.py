"""Each robot's own action space: the layout of an embodiment's action vector, padded into the model's. A dataset names
its embodiment (`DatasetSpec.embodiment`); the embodiment says what each action dimension is, which are grippers
(left unnormalized), which are absolute targets (a clip whose frames are several dataset steps apart keeps the last
step's value, not the mean of deltas) and which the model sees relative to a state dimension: every action of a
chunk minus that state at the chunk's start, openpi's delta actions and DreamZero's relative actions; their
statistics are computed on relative values and the policy adds the current state back. Clips pad the action to
`model.action_dim` (the widest embodiment of a run) and carry `action_dim_mask`, the dimensions that are real; the
loss counts only those, and the policy returns each robot its own dimensions. The 7-D end-effector delta (`eef7`) is
the layout of every OXE dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Embodiment:
    """The action layout of one kind of robot."""

    name: str
    action_names: tuple[str, ...]
    gripper_dims: tuple[int, ...] = ()  # left unnormalized (a binary or [0, 1] command)
    absolute_dims: tuple[int, ...] = ()  # targets, not per-step deltas
    # (action dim, state dim) pairs: the model sees the action minus that state dimension at the chunk's start.
    relative_to_state: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        dim = len(self.action_names)
        for field, dims in (("gripper_dims", self.gripper_dims), ("absolute_dims", self.absolute_dims),
                            ("relative_to_state", tuple(a for a, _ in self.relative_to_state))):
            bad = [d for d in dims if not 0 <= d < dim]
            if bad:
                raise ValueError(f"embodiment {self.name!r}: {field} {bad} outside its {dim} action dimensions")

    @property
    def action_dim(self) -> int:
        """Dimensions of this robot's own action vector."""
        return len(self.action_names)

    def action_mask(self) -> tuple[bool, ...]:
        """Per action dimension, whether it is normalized (every one but the grippers)."""
        return tuple(d not in self.gripper_dims for d in range(self.action_dim))

    def last_of_stride(self) -> np.ndarray:
        """Per action dimension, True where a strided clip keeps the stride's last value (grippers, absolute
        targets) rather than the mean of its per-step deltas."""
        keep = np.zeros(self.action_dim, bool)
        keep[list(self.gripper_dims) + list(self.absolute_dims)] = True
        return keep

    def to_relative(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """A chunk's raw actions [T, A] -> relative to the raw state [S] at its start, on the dimensions
        `relative_to_state` names (the others unchanged)."""
        out = np.array(actions, np.float32, copy=True)
        state = np.asarray(state, np.float32)
        for a, s in self.relative_to_state:
            out[..., a] -= state[..., s]
        return out

    def to_absolute(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Relative actions [T, A] -> raw, adding the raw state [S] at the chunk's start back (`to_relative`'s
        inverse)."""
        out = np.array(actions, np.float32, copy=True)
        state = np.asarray(state, np.float32)
        for a, s in self.relative_to_state:
            out[..., a] += state[..., s]
        return out

    def statistics_samples(self, actions: np.ndarray, states: np.ndarray, horizon: int) -> np.ndarray:
        """The action values the model sees, for normalization statistics: the raw actions [L, A], or for an
        embodiment with relative dimensions every chunk of `horizon` steps from every start made relative to
        its start state ([~L * horizon, A])."""
        if not self.relative_to_state:
            return np.asarray(actions, np.float32)
        return np.concatenate([self.to_relative(actions[t : t + horizon], states[t]) for t in range(len(actions))])


_EMBODIMENTS: dict[str, Embodiment] = {}


def register_embodiment(embodiment: Embodiment, *, overwrite: bool = False) -> None:
    """Adds an embodiment to the registry."""
    if embodiment.name in _EMBODIMENTS and not overwrite:
        raise ValueError(f"Embodiment {embodiment.name!r} is already registered; pass overwrite=True to replace it")
    _EMBODIMENTS[embodiment.name] = embodiment


def get_embodiment(name: str) -> Embodiment:
    """The registered embodiment `name`; the error lists the known ones."""
    try:
        return _EMBODIMENTS[name]
    except KeyError:
        raise KeyError(f"No embodiment {name!r}; known: {sorted(_EMBODIMENTS)}. Add one with "
                       "data_pipelines.standardize.embodiments.register_embodiment.") from None


def known_embodiments() -> list[str]:
    """Names of the registered embodiments, sorted."""
    return sorted(_EMBODIMENTS)


def pad_actions(actions: np.ndarray, width: int, dataset: str) -> np.ndarray:
    """[..., A] -> [..., width], zeros after the robot's own dimensions."""
    own = actions.shape[-1]
    if own > width:
        raise ValueError(f"{dataset}: actions have {own} dimensions, more than model.action_dim={width} (set it to "
                         f"the widest embodiment of the run)")
    return np.pad(np.asarray(actions, np.float32), [(0, 0)] * (actions.ndim - 1) + [(0, width - own)])


def dim_mask(own: int, width: int) -> np.ndarray:
    """bool [width]: the first `own` dimensions are the robot's."""
    return np.arange(width) < own


def joint_names(prefix: str, joints: int) -> tuple[str, ...]:
    """`prefix_joint_0` ... and `prefix_gripper`."""
    return (*(f"{prefix}_joint_{i}" for i in range(joints)), f"{prefix}_gripper")


def _names(*groups: Sequence[str]) -> tuple[str, ...]:
    return tuple(n for g in groups for n in g)


EEF7 = Embodiment(
    "eef7", ("delta_x", "delta_y", "delta_z", "delta_roll", "delta_pitch", "delta_yaw", "gripper_open"),
    gripper_dims=(6,),
)
# Two 6-joint arms with grippers (ALOHA-style), absolute joint-position targets.
BIMANUAL_JOINTS14 = Embodiment(
    "bimanual_joints14", _names(joint_names("left", 6), joint_names("right", 6)),
    gripper_dims=(6, 13), absolute_dims=tuple(range(14)),
)
# The same arms with joint targets relative to the current joint state (state dims 0-5 and 7-12).
BIMANUAL_JOINTS14_RELATIVE = Embodiment(
    "bimanual_joints14_relative", BIMANUAL_JOINTS14.action_names, gripper_dims=(6, 13),
    absolute_dims=(6, 13), relative_to_state=tuple((d, d) for d in (*range(6), *range(7, 13))),
)
for _embodiment in (EEF7, BIMANUAL_JOINTS14, BIMANUAL_JOINTS14_RELATIVE):
    register_embodiment(_embodiment)
