"""Writes small local TFDS datasets in the published Open X-Embodiment (RLDS) formats.

There is no network in tests or on many clusters, so this module makes datasets whose feature specs
(observation keys, image encodings, state, action as a tensor or a dict, language instruction,
is_first/is_last/is_terminal, reward, discount where published, episode metadata) follow the real OXE
releases of the same name, as `tests/test_oxe_specs.py` checks against the published specs. Image shapes
default to the published ones and can be shrunk with `image_size` for speed.

Frames are rendered procedurally: an end effector moves over a textured table according to the
episode's actions (xyz translation, yaw, gripper), so a model can learn how actions change frames.

    python -m data_pipelines.make_oxe_like --out=DIR --datasets=fractal20220817_data,bridge,taco_play,droid \
        --episodes=8 --image_size=64,80
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_pipelines.scenes import TASKS, Trajectory, make_trajectory, render_frame  # noqa: F401  (re-exported)

_IMAGE = tfds.features.Image
_TENSOR = tfds.features.Tensor
_SCALAR = tfds.features.Scalar
# The releases store text as plain string tensors (not tfds.features.Text) and scalars such as
# `terminate_episode` as shape-() tensors; only reward (and DROID's discount) are Scalar features.
_STRING = _TENSOR(shape=(), dtype=np.object_)
_F32 = _TENSOR(shape=(), dtype=np.float32)

def _embedding(instruction: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(instruction.encode()))
    return rng.normal(size=512).astype(np.float32)


def _base_steps(traj: Trajectory, discount: bool = False) -> list[dict[str, Any]]:
    length = len(traj.gripper_open)
    steps = [
        {
            "is_first": i == 0,
            "is_last": i == length - 1,
            "is_terminal": i == length - 1,
            "reward": np.float32(1.0 if i == length - 1 else 0.0),
        }
        for i in range(length)
    ]
    if discount:  # Only some releases (DROID) carry a discount.
        for step in steps:
            step["discount"] = np.float32(1.0)
    return steps


def _quaternion_z(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)], np.float32)


@dataclasses.dataclass(frozen=True)
class _Maker:
    """Feature spec and episode writer of one OXE dataset."""

    version: str
    image_shapes: dict[str, tuple[int, int]]  # camera key -> published (H, W)
    features: Callable[[dict[str, tuple[int, int]]], tfds.features.FeaturesDict]
    episode: Callable[[Trajectory, dict[str, tuple[int, int]]], dict[str, Any]]


def _fractal_features(shapes: dict[str, tuple[int, int]]) -> tfds.features.FeaturesDict:
    f32 = np.float32
    return tfds.features.FeaturesDict(
        {
            # Episode-level crowd ratings and collection attributes of RT-1.
            "aspects": {
                key: np.bool_ for key in ("already_success", "feasible", "has_aspects", "success", "undesirable")
            },
            "attributes": {
                **{key: np.int64 for key in _FRACTAL_ATTRIBUTES},
                **{f"{key}_name": _STRING for key in _FRACTAL_ATTRIBUTES},
            },
            "steps": tfds.features.Dataset(
                {
                    "action": {
                        "base_displacement_vector": _TENSOR(shape=(2,), dtype=f32),
                        "base_displacement_vertical_rotation": _TENSOR(shape=(1,), dtype=f32),
                        "gripper_closedness_action": _TENSOR(shape=(1,), dtype=f32),
                        "rotation_delta": _TENSOR(shape=(3,), dtype=f32),
                        "terminate_episode": _TENSOR(shape=(3,), dtype=np.int32),
                        "world_vector": _TENSOR(shape=(3,), dtype=f32),
                    },
                    "is_first": np.bool_,
                    "is_last": np.bool_,
                    "is_terminal": np.bool_,
                    "observation": {
                        "base_pose_tool_reached": _TENSOR(shape=(7,), dtype=f32),
                        "gripper_closed": _TENSOR(shape=(1,), dtype=f32),
                        "gripper_closedness_commanded": _TENSOR(shape=(1,), dtype=f32),
                        "height_to_bottom": _TENSOR(shape=(1,), dtype=f32),
                        "image": _IMAGE(shape=(*shapes["image"], 3), dtype=np.uint8, encoding_format="jpeg"),
                        "natural_language_embedding": _TENSOR(shape=(512,), dtype=f32),
                        "natural_language_instruction": _STRING,
                        "orientation_box": _TENSOR(shape=(2, 3), dtype=f32),
                        "orientation_start": _TENSOR(shape=(4,), dtype=f32),
                        "robot_orientation_positions_box": _TENSOR(shape=(3, 3), dtype=f32),
                        "rotation_delta_to_go": _TENSOR(shape=(3,), dtype=f32),
                        "src_rotation": _TENSOR(shape=(4,), dtype=f32),
                        "vector_to_go": _TENSOR(shape=(3,), dtype=f32),
                        "workspace_bounds": _TENSOR(shape=(3, 3), dtype=f32),
                    },
                    "reward": _SCALAR(dtype=f32),
                }
            ),
        }
    )


_FRACTAL_ATTRIBUTES = ("collection_mode", "data_type", "env", "location", "objects_family", "task_family")
# The effector's reachable box (rows: min xyz, max xyz, center xyz) in the generator's unit cube.
_FRACTAL_WORKSPACE = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]], np.float32)


def _fractal_episode(traj: Trajectory, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    steps = _base_steps(traj)
    embedding = _embedding(traj.instruction)
    start_rotation = _quaternion_z(float(traj.eef_pose[0, 5]))
    for i, step in enumerate(steps):
        closed = 1.0 - traj.gripper_open[i]
        step["action"] = {
            "base_displacement_vector": np.zeros(2, np.float32),
            "base_displacement_vertical_rotation": np.zeros(1, np.float32),
            # RT-1 commands closedness in [-1, 1]: +1 closes.
            "gripper_closedness_action": np.array([2.0 * closed - 1.0], np.float32),
            "rotation_delta": traj.eef_delta[i, 3:6].astype(np.float32),
            "terminate_episode": np.array([0, 1, 0] if i < len(steps) - 1 else [1, 0, 0], np.int32),
            "world_vector": traj.eef_delta[i, :3].astype(np.float32),
        }
        step["observation"] = {
            "base_pose_tool_reached": np.concatenate(
                [traj.eef_pose[i, :3], _quaternion_z(float(traj.eef_pose[i, 5]))]
            ).astype(np.float32),
            "gripper_closed": np.array([closed], np.float32),
            "gripper_closedness_commanded": np.array([closed], np.float32),
            "height_to_bottom": traj.eef_pose[i, 2:3].astype(np.float32),
            "image": render_frame(traj.eef_pose[i], traj.gripper_open[i], traj.scene_seed, shapes["image"]),
            "natural_language_embedding": embedding,
            "natural_language_instruction": traj.instruction,
            "orientation_box": np.zeros((2, 3), np.float32),
            "orientation_start": start_rotation,
            "robot_orientation_positions_box": np.zeros((3, 3), np.float32),
            "rotation_delta_to_go": np.zeros(3, np.float32),
            "src_rotation": start_rotation,
            "vector_to_go": np.zeros(3, np.float32),
            "workspace_bounds": _FRACTAL_WORKSPACE,
        }
    attributes: dict[str, Any] = {key: np.int64(0) for key in _FRACTAL_ATTRIBUTES}
    attributes.update({f"{key}_name": "generated" for key in _FRACTAL_ATTRIBUTES})
    aspects = {"already_success": False, "feasible": True, "has_aspects": False, "success": True, "undesirable": False}
    return {"aspects": aspects, "attributes": attributes, "steps": steps}


def _bridge_features(shapes: dict[str, tuple[int, int]]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "action": {
                        "open_gripper": np.bool_,
                        "rotation_delta": _TENSOR(shape=(3,), dtype=np.float32),
                        "terminate_episode": _F32,
                        "world_vector": _TENSOR(shape=(3,), dtype=np.float32),
                    },
                    "is_first": np.bool_,
                    "is_last": np.bool_,
                    "is_terminal": np.bool_,
                    "observation": {
                        "image": _IMAGE(shape=(*shapes["image"], 3), dtype=np.uint8, encoding_format="jpeg"),
                        "natural_language_embedding": _TENSOR(shape=(512,), dtype=np.float32),
                        "natural_language_instruction": _STRING,
                        "state": _TENSOR(shape=(7,), dtype=np.float32),
                    },
                    "reward": _SCALAR(dtype=np.float32),
                }
            )
        }
    )


def _bridge_episode(traj: Trajectory, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    steps = _base_steps(traj)
    embedding = _embedding(traj.instruction)
    for i, step in enumerate(steps):
        step["action"] = {
            "open_gripper": bool(traj.gripper_open[i] > 0.5),
            "rotation_delta": traj.eef_delta[i, 3:6].astype(np.float32),
            "terminate_episode": np.float32(i == len(steps) - 1),
            "world_vector": traj.eef_delta[i, :3].astype(np.float32),
        }
        step["observation"] = {
            "image": render_frame(traj.eef_pose[i], traj.gripper_open[i], traj.scene_seed, shapes["image"]),
            "natural_language_embedding": embedding,
            "natural_language_instruction": traj.instruction,
            "state": np.concatenate([traj.eef_pose[i], [traj.gripper_open[i]]]).astype(np.float32),
        }
    return {"steps": steps}


def _taco_features(shapes: dict[str, tuple[int, int]]) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "action": {
                        "actions": _TENSOR(shape=(7,), dtype=np.float32),
                        "rel_actions_gripper": _TENSOR(shape=(7,), dtype=np.float32),
                        "rel_actions_world": _TENSOR(shape=(7,), dtype=np.float32),
                        "terminate_episode": _F32,
                    },
                    "is_first": np.bool_,
                    "is_last": np.bool_,
                    "is_terminal": np.bool_,
                    "observation": {
                        "depth_gripper": _TENSOR(shape=shapes["rgb_gripper"], dtype=np.float32),
                        "depth_static": _TENSOR(shape=shapes["rgb_static"], dtype=np.float32),
                        "natural_language_embedding": _TENSOR(shape=(512,), dtype=np.float32),
                        "natural_language_instruction": _STRING,
                        "rgb_gripper": _IMAGE(shape=(*shapes["rgb_gripper"], 3), dtype=np.uint8, encoding_format="png"),
                        "rgb_static": _IMAGE(shape=(*shapes["rgb_static"], 3), dtype=np.uint8, encoding_format="png"),
                        "robot_obs": _TENSOR(shape=(15,), dtype=np.float32),
                        "structured_language_instruction": _STRING,
                    },
                    "reward": _SCALAR(dtype=np.float32),
                }
            )
        }
    )


def _taco_episode(traj: Trajectory, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    steps = _base_steps(traj)
    embedding = _embedding(traj.instruction)
    for i, step in enumerate(steps):
        # TACO-play's relative actions are scaled to [-1, 1] and its gripper action is -1 close / +1 open.
        gripper = 2.0 * traj.gripper_open[i] - 1.0
        rel = np.concatenate([traj.eef_delta[i] / 0.05, [gripper]]).astype(np.float32)
        absolute = np.concatenate([traj.eef_pose[i] + traj.eef_delta[i], [gripper]]).astype(np.float32)
        step["action"] = {
            "actions": absolute,
            "rel_actions_gripper": rel,
            "rel_actions_world": rel,
            "terminate_episode": np.float32(i == len(steps) - 1),
        }
        robot_obs = np.zeros(15, np.float32)
        robot_obs[:6] = traj.eef_pose[i]
        robot_obs[6] = 0.08 * traj.gripper_open[i]
        step["observation"] = {
            "depth_gripper": np.full(shapes["rgb_gripper"], 0.3, np.float32),
            "depth_static": np.full(shapes["rgb_static"], 1.2, np.float32),
            "natural_language_embedding": embedding,
            "natural_language_instruction": traj.instruction,
            "rgb_gripper": render_frame(
                traj.eef_pose[i], traj.gripper_open[i], traj.scene_seed, shapes["rgb_gripper"], wrist=True
            ),
            "rgb_static": render_frame(traj.eef_pose[i], traj.gripper_open[i], traj.scene_seed, shapes["rgb_static"]),
            "robot_obs": robot_obs,
            "structured_language_instruction": traj.instruction.replace(" ", "_"),
        }
    return {"steps": steps}


def _droid_features(shapes: dict[str, tuple[int, int]]) -> tfds.features.FeaturesDict:
    f64 = np.float64
    camera = lambda key: _IMAGE(shape=(*shapes[key], 3), dtype=np.uint8, encoding_format="jpeg")
    return tfds.features.FeaturesDict(
        {
            "episode_metadata": {"file_path": _STRING, "recording_folderpath": _STRING},
            "steps": tfds.features.Dataset(
                {
                    "action": _TENSOR(shape=(7,), dtype=f64),
                    "action_dict": {
                        "cartesian_position": _TENSOR(shape=(6,), dtype=f64),
                        "cartesian_velocity": _TENSOR(shape=(6,), dtype=f64),
                        "gripper_position": _TENSOR(shape=(1,), dtype=f64),
                        "gripper_velocity": _TENSOR(shape=(1,), dtype=f64),
                        "joint_position": _TENSOR(shape=(7,), dtype=f64),
                        "joint_velocity": _TENSOR(shape=(7,), dtype=f64),
                    },
                    "discount": _SCALAR(dtype=np.float32),
                    "is_first": np.bool_,
                    "is_last": np.bool_,
                    "is_terminal": np.bool_,
                    "language_instruction": _STRING,
                    "language_instruction_2": _STRING,
                    "language_instruction_3": _STRING,
                    "observation": {
                        "cartesian_position": _TENSOR(shape=(6,), dtype=f64),
                        "exterior_image_1_left": camera("exterior_image_1_left"),
                        "exterior_image_2_left": camera("exterior_image_2_left"),
                        "gripper_position": _TENSOR(shape=(1,), dtype=f64),
                        "joint_position": _TENSOR(shape=(7,), dtype=f64),
                        "wrist_image_left": camera("wrist_image_left"),
                    },
                    "reward": _SCALAR(dtype=np.float32),
                }
            ),
        }
    )


def _droid_episode(traj: Trajectory, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    steps = _base_steps(traj, discount=True)
    for i, step in enumerate(steps):
        closed = 1.0 - float(traj.gripper_open[i])
        step["action"] = np.concatenate([np.zeros(6), [closed]])
        step["action_dict"] = {
            "cartesian_position": (traj.eef_pose[i] + traj.eef_delta[i]).astype(np.float64),
            "cartesian_velocity": traj.eef_delta[i].astype(np.float64),
            "gripper_position": np.array([closed]),
            "gripper_velocity": np.zeros(1),
            "joint_position": np.zeros(7),
            "joint_velocity": np.zeros(7),
        }
        step["language_instruction"] = traj.instruction
        step["language_instruction_2"] = ""
        step["language_instruction_3"] = ""
        pose, grip, scene = traj.eef_pose[i], traj.gripper_open[i], traj.scene_seed
        step["observation"] = {
            "cartesian_position": traj.eef_pose[i].astype(np.float64),
            "exterior_image_1_left": render_frame(pose, grip, scene, shapes["exterior_image_1_left"]),
            "exterior_image_2_left": render_frame(pose, grip, scene + 1, shapes["exterior_image_2_left"]),
            "gripper_position": np.array([1.0 - traj.gripper_open[i]], np.float64),
            "joint_position": np.zeros(7),
            "wrist_image_left": render_frame(pose, grip, scene, shapes["wrist_image_left"], wrist=True),
        }
    return {
        "episode_metadata": {
            "file_path": f"/episodes/{traj.scene_seed}/trajectory.h5",
            "recording_folderpath": "",
        },
        "steps": steps,
    }


MAKERS: dict[str, _Maker] = {
    "fractal20220817_data": _Maker("0.1.0", {"image": (256, 320)}, _fractal_features, _fractal_episode),
    "bridge": _Maker("0.1.0", {"image": (480, 640)}, _bridge_features, _bridge_episode),
    "taco_play": _Maker("0.1.0", {"rgb_static": (150, 200), "rgb_gripper": (84, 84)}, _taco_features, _taco_episode),
    "droid": _Maker(
        "1.0.0",
        {k: (180, 320) for k in ("exterior_image_1_left", "exterior_image_2_left", "wrist_image_left")},
        _droid_features,
        _droid_episode,
    ),
}


def generated_builder(
    dataset_name: str,
    data_dir: str,
    features: tfds.features.FeaturesDict,
    episodes: Callable[[], Iterator[tuple[Any, dict[str, Any]]]],
    version: str,
    description: str = "OXE-format (generated)",
    release_notes: str = "Procedurally generated in the published OXE format.",
) -> tfds.core.DatasetBuilder:
    """A TFDS builder of a dataset generated here (one `train` split of `episodes()`), for local data."""

    class _OxeLikeBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: release_notes}  # noqa: RUF012
        # TFDS looks for a checksums file next to the builder's code; a generated dataset has none, and
        # the lookup needs a package (importlib_resources) that is not a dependency.
        code_path = None
        # TFDS locates builder metadata through the defining module, which must be a package module even
        # when this file runs as `python -m` (where it is `__main__`).
        __module__ = "data_pipelines.make_oxe_like"

        def _info(self) -> tfds.core.DatasetInfo:
            return self.dataset_info_from_configs(features=features, description=description)

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            return {"train": self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
            yield from episodes()

    return _OxeLikeBuilder(data_dir=data_dir)


def make_datasets(
    out_dir: str,
    datasets: Sequence[str],
    episodes: int,
    seed: int = 0,
    *,
    image_size: tuple[int, int] | None = None,
    min_steps: int = 20,
    max_steps: int = 40,
    file_format: str = "array_record",
    num_shards: int | None = None,
) -> None:
    """Writes `episodes` generated episodes of each OXE dataset in `datasets` to `out_dir/<name>/<version>`.

    `image_size` (H, W) replaces every camera's published shape (the keys and encodings stay); None keeps
    the published shapes. `file_format` is "array_record" (random access, what the pipeline reads) or
    "tfrecord" (the format OXE is published in; see `data_pipelines.convert`). `num_shards` fixes the
    number of shard files per dataset (None: TFDS picks by size).
    """
    tfds.disable_progress_bar()
    unknown = [name for name in datasets if name not in MAKERS]
    if unknown:
        raise ValueError(f"No OXE-format maker for datasets {unknown}; known: {sorted(MAKERS)}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    for index, name in enumerate(datasets):
        maker = MAKERS[name]
        shapes = {key: tuple(image_size) if image_size else shape for key, shape in maker.image_shapes.items()}

        def generate(name=name, index=index, maker=maker, shapes=shapes) -> Iterator[tuple[int, dict[str, Any]]]:
            rng = np.random.default_rng([seed, index])
            for episode in range(episodes):
                traj = make_trajectory(rng, int(rng.integers(min_steps, max_steps + 1)))
                yield episode, maker.episode(traj, shapes)

        builder = generated_builder(name, out_dir, maker.features(shapes), generate, maker.version)
        builder.download_and_prepare(
            file_format=file_format,
            download_config=tfds.download.DownloadConfig(verify_ssl=False, num_shards=num_shards),
        )
        logging.info("Wrote %d episodes of %s to %s", episodes, name, builder.data_dir)


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    image_size = tuple(int(v) for v in FLAGS.image_size) if FLAGS.image_size else None
    make_datasets(
        os.path.expanduser(FLAGS.out),
        FLAGS.datasets,
        FLAGS.episodes,
        FLAGS.seed,
        image_size=image_size,
        file_format=FLAGS.file_format,
        num_shards=FLAGS.num_shards,
    )
    print(f"Wrote {FLAGS.episodes} episodes of {', '.join(FLAGS.datasets)} to {FLAGS.out}")


if __name__ == "__main__":
    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_string("out", None, "Directory to write the TFDS datasets under.")
    flags.DEFINE_list("datasets", list(MAKERS), "OXE dataset names to generate.")
    flags.DEFINE_integer("episodes", 8, "Episodes per dataset.")
    flags.DEFINE_integer("seed", 0, "Random seed of trajectories and scenes.")
    flags.DEFINE_list("image_size", None, "H,W replacing every camera's published shape.")
    flags.DEFINE_integer("num_shards", None, "Shard files per dataset (default: TFDS picks by size).")
    flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"], "Storage format.")
    app.run(main)
