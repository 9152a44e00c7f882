"""Per-dataset standardization of Open X-Embodiment datasets (Octo style).

Each entry lists every camera of the dataset, says which is the primary (and wrist) view, and how one RLDS
step becomes the shared 7-D action (EEF delta xyz, delta rpy, gripper in [0, 1] with 1 = open), the proprio
vector and the language instruction. Adding a dataset is one `register_dataset` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from data_pipelines.standardize import embodiments

Step = Mapping[str, Any]
ACTION_DIM = 7
# The gripper dimension keeps its raw [0, 1] value: normalizing a binary signal only blurs it.
DEFAULT_ACTION_MASK = embodiments.EEF7.action_mask()


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one RLDS dataset into the shared clip contract."""

    primary_camera: str  # key under steps/observation
    action: Callable[[Step], np.ndarray]  # one step -> float [7]
    proprio: Callable[[Step], np.ndarray]  # one step -> float [p], p <= data.proprio_dim
    instruction: Callable[[Step], bytes | str]
    wrist_camera: str | None = None
    action_mask: tuple[bool, ...] | None = None  # True: dimension is normalized; None: the embodiment's
    embodiment: str = "eef7"  # the action layout (data_pipelines.standardize.embodiments)
    proprio_mask: tuple[bool, ...] | None = None  # None: every proprio dimension is normalized
    cameras: tuple[str, ...] = ()  # every camera (observation key) of the dataset; () = primary and wrist

    def layout(self) -> embodiments.Embodiment:
        """The dataset's action layout."""
        return embodiments.get_embodiment(self.embodiment)

    def normalized_action_dims(self) -> tuple[bool, ...]:
        """Per action dimension, whether it is normalized: `action_mask`, else all but the embodiment's grippers."""
        return tuple(self.action_mask) if self.action_mask is not None else self.layout().action_mask()

    def camera_keys(self) -> tuple[str, ...]:
        """Every camera of the dataset, as observation keys."""
        return self.cameras or (self.primary_camera, *([self.wrist_camera] if self.wrist_camera else []))

    def camera_key(self, dataset: str, camera: str) -> str:
        """The observation key of `camera`: a key of the dataset, or the role `primary` / `wrist`."""
        key = {"primary": self.primary_camera, "wrist": self.wrist_camera}.get(camera, camera)
        if key not in self.camera_keys():
            raise ValueError(
                f"data.cameras: dataset {dataset!r} has no camera {camera!r}; its cameras are "
                f"{list(self.camera_keys())} (or the roles 'primary'"
                + (", 'wrist')" if self.wrist_camera else ")")
            )
        return key


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(name: str, spec: DatasetSpec, *, overwrite: bool = False) -> None:
    """Adds the standardization of dataset `name` (its TFDS name) to the registry."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"Dataset {name!r} is already registered; pass overwrite=True to replace it")
    dim = spec.layout().action_dim
    if len(spec.normalized_action_dims()) != dim:
        raise ValueError(f"{name}: action_mask has {len(spec.action_mask)} entries, its embodiment "
                         f"{spec.embodiment!r} has {dim} action dimensions")
    _REGISTRY[name] = spec


def get_spec(name: str) -> DatasetSpec:
    """Returns the registered spec of `name`; the error lists the known datasets."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"No standardization registered for dataset {name!r}; known datasets: {known_datasets()}. "
            "Add one with data_pipelines.standardize.registry.register_dataset."
        ) from None


def registered(name: str) -> DatasetSpec | None:
    """The spec registered under `name`, or None."""
    return _REGISTRY.get(name)


def known_datasets() -> list[str]:
    """Names of the registered TFDS/RLDS datasets, sorted (LeRobot layouts, `lerobot:...`, are not datasets)."""
    return sorted(n for n in _REGISTRY if not n.startswith("lerobot:"))


def _f32(*parts: Any) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.float32).reshape(-1) for p in parts]).astype(np.float32)


def _fractal_action(step: Step) -> np.ndarray:
    action = step["action"]
    # RT-1 commands gripper closedness in [-1, 1] (+1 closes); map to openness in [0, 1].
    gripper_open = np.clip((1.0 - np.asarray(action["gripper_closedness_action"])) / 2.0, 0.0, 1.0)
    return _f32(action["world_vector"], action["rotation_delta"], gripper_open)


def _bridge_action(step: Step) -> np.ndarray:
    action = step["action"]
    return _f32(action["world_vector"], action["rotation_delta"], action["open_gripper"])


def _taco_action(step: Step) -> np.ndarray:
    rel = np.asarray(step["action"]["rel_actions_world"], np.float32)
    # TACO-play's gripper action is -1 (close) / +1 (open).
    return _f32(rel[:6], np.clip((rel[6] + 1.0) / 2.0, 0.0, 1.0))


def _droid_action(step: Step) -> np.ndarray:
    action = step["action_dict"]
    # DROID stores gripper position (1 = closed).
    return _f32(action["cartesian_velocity"], 1.0 - np.asarray(action["gripper_position"]))


register_dataset(
    "fractal20220817_data",
    DatasetSpec(
        primary_camera="image",
        cameras=("image",),
        action=_fractal_action,
        proprio=lambda s: _f32(s["observation"]["base_pose_tool_reached"], s["observation"]["gripper_closed"]),
        instruction=lambda s: s["observation"]["natural_language_instruction"],
        proprio_mask=(True,) * 7 + (False,),
    ),
)
register_dataset(
    "bridge",
    DatasetSpec(
        primary_camera="image",
        cameras=("image",),
        action=_bridge_action,
        proprio=lambda s: _f32(s["observation"]["state"]),
        instruction=lambda s: s["observation"]["natural_language_instruction"],
        proprio_mask=(True,) * 6 + (False,),
    ),
)
register_dataset(
    "taco_play",
    DatasetSpec(
        primary_camera="rgb_static",
        wrist_camera="rgb_gripper",
        cameras=("rgb_static", "rgb_gripper"),
        action=_taco_action,
        proprio=lambda s: _f32(np.asarray(s["observation"]["robot_obs"])[:7]),
        instruction=lambda s: s["observation"]["natural_language_instruction"],
        proprio_mask=(True,) * 6 + (False,),
    ),
)
register_dataset(
    "droid",
    DatasetSpec(
        primary_camera="exterior_image_1_left",
        wrist_camera="wrist_image_left",
        cameras=("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left"),
        action=_droid_action,
        proprio=lambda s: _f32(s["observation"]["cartesian_position"], s["observation"]["gripper_position"]),
        instruction=lambda s: s["language_instruction"],
        proprio_mask=(True,) * 6 + (False,),
    ),
)


# --- Meta-World (simulator episodes from `python -m wamjax.jobs.collect_sim`) -----------------------------
# Its 4-D action is an end-effector delta xyz plus a gripper command in [-1, 1] (+1 closes), with no rotation.
# The standard action keeps xyz, holds rotation at 0 (left unnormalized: it never varies) and maps the
# gripper to openness in [0, 1]; `metaworld_action_from_standard` is the exact inverse on those dimensions.


def metaworld_action_to_standard(action: np.ndarray) -> np.ndarray:
    """Meta-World's 4-D action [..., 4] -> the standard 7-D action [..., 7]."""
    action = np.asarray(action, np.float32)
    if action.shape[-1] != 4:
        raise ValueError(f"a Meta-World action has 4 values (xyz, gripper); got shape {action.shape}")
    gripper_open = np.clip((1.0 - action[..., 3:]) / 2.0, 0.0, 1.0)
    return np.concatenate([action[..., :3], np.zeros_like(action[..., :3]), gripper_open], -1).astype(np.float32)


def metaworld_action_from_standard(action: np.ndarray) -> np.ndarray:
    """The standard 7-D action [..., 7] -> Meta-World's 4-D action [..., 4], clipped to its [-1, 1] range."""
    action = np.asarray(action, np.float32)
    if action.shape[-1] != ACTION_DIM:
        raise ValueError(f"a standard action has {ACTION_DIM} values; got shape {action.shape}")
    gripper = 1.0 - 2.0 * action[..., 6:]
    return np.clip(np.concatenate([action[..., :3], gripper], -1), -1.0, 1.0).astype(np.float32)


register_dataset(
    "metaworld",
    DatasetSpec(
        primary_camera="image",
        wrist_camera="wrist_image",
        action=lambda s: metaworld_action_to_standard(s["action"]),
        proprio=lambda s: _f32(s["observation"]["state"]),
        instruction=lambda s: s["language_instruction"],
        action_mask=(True, True, True, False, False, False, False),
        proprio_mask=(True, True, True, False),
    ),
)

# The same episodes written as a LeRobot dataset (`collect_sim --format=lerobot`): the same mapping, by feature name.
register_dataset(
    "lerobot:robot_type=metaworld",
    DatasetSpec(
        primary_camera="observation.images.image",
        wrist_camera="observation.images.wrist_image",
        cameras=("observation.images.image", "observation.images.wrist_image"),
        action=lambda s: metaworld_action_to_standard(s["action"]),
        proprio=lambda s: _f32(s["observation.state"]),
        instruction=lambda s: s["task"],
        action_mask=(True, True, True, False, False, False, False),
        proprio_mask=(True, True, True, False),
    ),
)
