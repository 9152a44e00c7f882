"""What `make_oxe_like` writes matches the published feature specs of the four OXE datasets, exactly.

The tables below are the published specs, one row per feature (name, TFDS feature class, shape,
dtype), in the layout of the TFDS catalog's "Feature documentation" section (descriptions left out):

- fractal20220817_data, bridge, taco_play: the TFDS catalog pages (https://www.tensorflow.org/datasets/
  catalog/<name>), i.e. docs/catalog/<name>.md in github.com/tensorflow/datasets (fractal20220817_data
  and taco_play at commit 4b2da8f0702eb8b01ac2728f5de6df120dbe327a, bridge at 124318866f274a497a9c9086b42ec82888aedb21).
  None of the three has a step `discount`; fractal20220817_data has episode-level `aspects` and `attributes`.
- droid (1.0.0): the "Dataset Schema" of docs/the-droid-dataset.md in github.com/droid-dataset/droid
  (commit 1548722f199772a43217c0d4c811c639be66e380). It writes `tf.Text` for the language fields and
  `tf.Scalar` for the booleans; the released features are plain string and bool tensors, as
  `builder.info.features` of the release prints them (`'language_instruction': string`, `'is_first': bool`).

The catalog prints `Image(shape, dtype)` without the encoding (TFDS's repr omits it), so the image
encodings are not part of the published tables; `ENCODINGS` holds the ones the maker writes so they
do not drift silently.

What the maker writes is read back with `tfds.builder_from_directory(...).info.features` and flattened
with the same `catalog_documentation()` the TFDS catalog is generated from.
"""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.features.feature import dtype_to_str

from data_pipelines import make_oxe_like
from data_pipelines.sources.rlds import EpisodeSource
from data_pipelines.standardize import registry

PUBLISHED = {
    "fractal20220817_data": """
                                                  | FeaturesDict |               |
aspects                                           | FeaturesDict |               |
aspects/already_success                           | Tensor       |               | bool
aspects/feasible                                  | Tensor       |               | bool
aspects/has_aspects                               | Tensor       |               | bool
aspects/success                                   | Tensor       |               | bool
aspects/undesirable                               | Tensor       |               | bool
attributes                                        | FeaturesDict |               |
attributes/collection_mode                        | Tensor       |               | int64
attributes/collection_mode_name                   | Tensor       |               | string
attributes/data_type                              | Tensor       |               | int64
attributes/data_type_name                         | Tensor       |               | string
attributes/env                                    | Tensor       |               | int64
attributes/env_name                               | Tensor       |               | string
attributes/location                               | Tensor       |               | int64
attributes/location_name                          | Tensor       |               | string
attributes/objects_family                         | Tensor       |               | int64
attributes/objects_family_name                    | Tensor       |               | string
attributes/task_family                            | Tensor       |               | int64
attributes/task_family_name                       | Tensor       |               | string
steps                                             | Dataset      |               |
steps/action                                      | FeaturesDict |               |
steps/action/base_displacement_vector             | Tensor       | (2,)          | float32
steps/action/base_displacement_vertical_rotation  | Tensor       | (1,)          | float32
steps/action/gripper_closedness_action            | Tensor       | (1,)          | float32
steps/action/rotation_delta                       | Tensor       | (3,)          | float32
steps/action/terminate_episode                    | Tensor       | (3,)          | int32
steps/action/world_vector                         | Tensor       | (3,)          | float32
steps/is_first                                    | Tensor       |               | bool
steps/is_last                                     | Tensor       |               | bool
steps/is_terminal                                 | Tensor       |               | bool
steps/observation                                 | FeaturesDict |               |
steps/observation/base_pose_tool_reached          | Tensor       | (7,)          | float32
steps/observation/gripper_closed                  | Tensor       | (1,)          | float32
steps/observation/gripper_closedness_commanded    | Tensor       | (1,)          | float32
steps/observation/height_to_bottom                | Tensor       | (1,)          | float32
steps/observation/image                           | Image        | (256, 320, 3) | uint8
steps/observation/natural_language_embedding      | Tensor       | (512,)        | float32
steps/observation/natural_language_instruction    | Tensor       |               | string
steps/observation/orientation_box                 | Tensor       | (2, 3)        | float32
steps/observation/orientation_start               | Tensor       | (4,)          | float32
steps/observation/robot_orientation_positions_box | Tensor       | (3, 3)        | float32
steps/observation/rotation_delta_to_go            | Tensor       | (3,)          | float32
steps/observation/src_rotation                    | Tensor       | (4,)          | float32
steps/observation/vector_to_go                    | Tensor       | (3,)          | float32
steps/observation/workspace_bounds                | Tensor       | (3, 3)        | float32
steps/reward                                      | Scalar       |               | float32
""",
    "bridge": """
                                               | FeaturesDict |               |
steps                                          | Dataset      |               |
steps/action                                   | FeaturesDict |               |
steps/action/open_gripper                      | Tensor       |               | bool
steps/action/rotation_delta                    | Tensor       | (3,)          | float32
steps/action/terminate_episode                 | Tensor       |               | float32
steps/action/world_vector                      | Tensor       | (3,)          | float32
steps/is_first                                 | Tensor       |               | bool
steps/is_last                                  | Tensor       |               | bool
steps/is_terminal                              | Tensor       |               | bool
steps/observation                              | FeaturesDict |               |
steps/observation/image                        | Image        | (480, 640, 3) | uint8
steps/observation/natural_language_embedding   | Tensor       | (512,)        | float32
steps/observation/natural_language_instruction | Tensor       |               | string
steps/observation/state                        | Tensor       | (7,)          | float32
steps/reward                                   | Scalar       |               | float32
""",
    "taco_play": """
                                                  | FeaturesDict |               |
steps                                             | Dataset      |               |
steps/action                                      | FeaturesDict |               |
steps/action/actions                              | Tensor       | (7,)          | float32
steps/action/rel_actions_gripper                  | Tensor       | (7,)          | float32
steps/action/rel_actions_world                    | Tensor       | (7,)          | float32
steps/action/terminate_episode                    | Tensor       |               | float32
steps/is_first                                    | Tensor       |               | bool
steps/is_last                                     | Tensor       |               | bool
steps/is_terminal                                 | Tensor       |               | bool
steps/observation                                 | FeaturesDict |               |
steps/observation/depth_gripper                   | Tensor       | (84, 84)      | float32
steps/observation/depth_static                    | Tensor       | (150, 200)    | float32
steps/observation/natural_language_embedding      | Tensor       | (512,)        | float32
steps/observation/natural_language_instruction    | Tensor       |               | string
steps/observation/rgb_gripper                     | Image        | (84, 84, 3)   | uint8
steps/observation/rgb_static                      | Image        | (150, 200, 3) | uint8
steps/observation/robot_obs                       | Tensor       | (15,)         | float32
steps/observation/structured_language_instruction | Tensor       |               | string
steps/reward                                      | Scalar       |               | float32
""",
    "droid": """
                                        | FeaturesDict |               |
episode_metadata                        | FeaturesDict |               |
episode_metadata/file_path              | Tensor       |               | string
episode_metadata/recording_folderpath   | Tensor       |               | string
steps                                   | Dataset      |               |
steps/action                            | Tensor       | (7,)          | float64
steps/action_dict                       | FeaturesDict |               |
steps/action_dict/cartesian_position    | Tensor       | (6,)          | float64
steps/action_dict/cartesian_velocity    | Tensor       | (6,)          | float64
steps/action_dict/gripper_position      | Tensor       | (1,)          | float64
steps/action_dict/gripper_velocity      | Tensor       | (1,)          | float64
steps/action_dict/joint_position        | Tensor       | (7,)          | float64
steps/action_dict/joint_velocity        | Tensor       | (7,)          | float64
steps/discount                          | Scalar       |               | float32
steps/is_first                          | Tensor       |               | bool
steps/is_last                           | Tensor       |               | bool
steps/is_terminal                       | Tensor       |               | bool
steps/language_instruction              | Tensor       |               | string
steps/language_instruction_2            | Tensor       |               | string
steps/language_instruction_3            | Tensor       |               | string
steps/observation                       | FeaturesDict |               |
steps/observation/cartesian_position    | Tensor       | (6,)          | float64
steps/observation/exterior_image_1_left | Image        | (180, 320, 3) | uint8
steps/observation/exterior_image_2_left | Image        | (180, 320, 3) | uint8
steps/observation/gripper_position      | Tensor       | (1,)          | float64
steps/observation/joint_position        | Tensor       | (7,)          | float64
steps/observation/wrist_image_left      | Image        | (180, 320, 3) | uint8
steps/reward                            | Scalar       |               | float32
""",
}

ENCODINGS = {
    "fractal20220817_data": {"image": "jpeg"},
    "bridge": {"image": "jpeg"},
    "taco_play": {"rgb_gripper": "png", "rgb_static": "png"},
    "droid": {"exterior_image_1_left": "jpeg", "exterior_image_2_left": "jpeg", "wrist_image_left": "jpeg"},
}


def _published_rows(table: str) -> list[tuple[str, ...]]:
    rows = []
    for line in table.strip("\n").splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        rows.append(tuple(cells + [""] * (4 - len(cells))))
    return sorted(rows)


def _written_rows(features: tfds.features.FeaturesDict) -> list[tuple[str, ...]]:
    rows = []
    for doc in features.catalog_documentation():
        info = doc.tensor_info
        shape = str(info.shape) if info is not None and info.shape else ""
        dtype = dtype_to_str(info.np_dtype) if info is not None and info.np_dtype is not None else ""
        rows.append((doc.name, doc.cls_name, shape, dtype))
    return sorted(rows)


@pytest.fixture(scope="module")
def published_shape_dir(tmp_path_factory):
    """One short episode of each dataset at the published image shapes."""
    out = str(tmp_path_factory.mktemp("oxe_published"))
    make_oxe_like.make_datasets(out, list(PUBLISHED), episodes=1, seed=0, min_steps=3, max_steps=3)
    return out


def _builder(out: str, name: str) -> tfds.core.DatasetBuilder:
    return tfds.builder_from_directory(os.path.join(out, name, make_oxe_like.MAKERS[name].version))


def test_every_maker_has_a_published_spec():
    assert sorted(PUBLISHED) == sorted(make_oxe_like.MAKERS) == sorted(ENCODINGS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_written_features_match_the_published_spec(published_shape_dir, name):
    features = _builder(published_shape_dir, name).info.features
    written, published = _written_rows(features), _published_rows(PUBLISHED[name])
    missing = sorted(set(published) - set(written))
    extra = sorted(set(written) - set(published))
    assert not missing and not extra, f"{name}: missing (published, not written) {missing}; extra {extra}"
    observation = features["steps"]["observation"]
    for camera, encoding in ENCODINGS[name].items():
        assert observation[camera].encoding_format == encoding, (name, camera)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registry_standardizes_the_full_spec(published_shape_dir, name):
    source = EpisodeSource(published_shape_dir, name)
    episode = source[0]
    assert episode.actions.shape == (3, registry.ACTION_DIM) and np.all(np.isfinite(episode.actions))
    assert episode.proprio.ndim == 2 and episode.instruction in make_oxe_like.TASKS
    height, width = make_oxe_like.MAKERS[name].image_shapes[registry.get_spec(name).primary_camera]
    assert episode.decode_frame(0, None).shape == (height, width, 3)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_registry_lists_every_published_camera(name):
    """Every Image feature of the published observation is a camera of the registry (droid: two exterior, wrist)."""
    published = {row[0].removeprefix("steps/observation/") for row in _published_rows(PUBLISHED[name])
                 if row[1] == "Image" and row[0].startswith("steps/observation/")}
    spec = registry.get_spec(name)
    assert set(spec.camera_keys()) == published and len(spec.camera_keys()) == len(published)
    assert spec.primary_camera in published and spec.wrist_camera in (None, *published)
