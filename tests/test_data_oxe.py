"""OXE-format datasets, per-dataset standardization, statistics and clip windows."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import make_oxe_like
from data_pipelines.clips import windowing
from data_pipelines.convert import convert
from data_pipelines.sources.rlds import EpisodeSource
from data_pipelines.sources.synthetic import SyntheticClip
from data_pipelines.sources.video import ClipToExample
from data_pipelines.standardize import registry
from data_pipelines.standardize import stats as stats_lib

DATASETS = ["fractal20220817_data", "bridge", "taco_play", "droid"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def oxe_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("oxe"))
    make_oxe_like.make_datasets(out, DATASETS, episodes=3, seed=0, image_size=(24, 32))
    return out


def test_every_registered_dataset_has_a_maker():
    # metaworld's episodes come from the simulator's scripted experts (wamjax.jobs.collect_sim).
    assert sorted([*make_oxe_like.MAKERS, "metaworld"]) == registry.known_datasets()


def test_generated_datasets_have_published_feature_specs(oxe_dir):
    bridge = tfds.builder_from_directory(os.path.join(oxe_dir, "bridge", "0.1.0"))
    assert bridge.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    steps = bridge.info.features["steps"].feature
    assert sorted(steps["action"].keys()) == ["open_gripper", "rotation_delta", "terminate_episode", "world_vector"]
    assert steps["observation"]["image"].encoding_format == "jpeg"
    assert sorted(steps.keys()) == ["action", "is_first", "is_last", "is_terminal", "observation", "reward"]
    droid = tfds.builder_from_directory(os.path.join(oxe_dir, "droid", "1.0.0"))
    droid_steps = droid.info.features["steps"].feature
    assert droid_steps["action"].shape == (7,) and droid_steps["action"].np_dtype == np.float64
    assert "episode_metadata" in droid.info.features
    assert droid_steps["observation"]["wrist_image_left"].shape == (24, 32, 3)
    # tfds.builder("taco_play") would pick TFDS' own OXE importer, which fetches metadata from GCS.
    taco = tfds.builder_from_directory(os.path.join(oxe_dir, "taco_play", "0.1.0"))
    assert taco.info.features["steps"].feature["observation"]["rgb_static"].encoding_format == "png"
    # TFDS' own random-access reader sees the same episodes.
    source = taco.as_data_source(split="train")
    episode = source[0]
    assert episode["steps"][0]["is_first"] and len(source) == 3


@pytest.mark.parametrize("name", DATASETS)
def test_standardization(oxe_dir, name):
    source = EpisodeSource(oxe_dir, name)
    assert len(source) == 3
    episode = source[1]
    assert 20 <= len(episode) <= 40
    assert episode.actions.shape == (len(episode), 7) and episode.actions.dtype == np.float32
    assert set(np.unique(episode.actions[:, 6])) <= {0.0, 1.0}
    assert episode.instruction in make_oxe_like.TASKS
    # The standardized xyz action moves the proprio xyz: same direction on every dataset.
    motion = np.diff(episode.proprio[:, :3], axis=0)
    for axis in range(2):
        corr = np.corrcoef(motion[:, axis], episode.actions[:-1, axis])[0, 1]
        assert corr > 0.99, (name, axis, corr)
    frame = episode.decode_frame(0, (16, 16))
    assert frame.shape == (16, 16, 3) and frame.dtype == np.uint8 and frame.std() > 5
    has_wrist = name in ("taco_play", "droid")
    assert (episode.wrist_images is not None) == has_wrist
    if has_wrist:
        assert episode.decode_frame(2, None, wrist=True).shape == (24, 32, 3)


def test_unknown_dataset_names_known_ones():
    with pytest.raises(KeyError, match="known datasets: .*bridge.*droid"):
        registry.get_spec("not_a_dataset")


def test_register_dataset_adds_one_entry():
    spec = registry.get_spec("bridge")
    registry.register_dataset("bridge_copy", spec)
    try:
        assert registry.get_spec("bridge_copy") is spec
        with pytest.raises(ValueError, match="already registered"):
            registry.register_dataset("bridge_copy", spec)
    finally:
        registry._REGISTRY.pop("bridge_copy")


def test_frames_follow_the_effector():
    left = make_oxe_like.render_frame(np.array([0.3, 0.4, 0.5, 0, 0, 0]), 1.0, 7, (48, 64))
    right = make_oxe_like.render_frame(np.array([0.7, 0.4, 0.5, 0, 0, 0]), 1.0, 7, (48, 64))
    closed = make_oxe_like.render_frame(np.array([0.7, 0.4, 0.5, 0, 0, 0]), 0.0, 7, (48, 64))

    def blob_x(image, color):
        mask = np.all(np.abs(image.astype(int) - color) < 10, axis=-1)
        return np.nonzero(mask)[1].mean()

    green = (25, 204, 51)
    assert blob_x(right, green) - blob_x(left, green) > 0.3 * 64
    assert not np.array_equal(right, closed)


def test_stats_layout_is_the_same_for_one_and_many(oxe_dir, tmp_path):
    one = stats_lib.compute_stats(oxe_dir, ["bridge"])
    many = stats_lib.compute_stats(oxe_dir, DATASETS)
    assert one["datasets"]["bridge"] == many["datasets"]["bridge"]
    for name, entry in many["datasets"].items():
        for group, dim in (("action", 7), ("proprio", 8)):
            for key in ("mean", "std", "q01", "q99", "min", "max", "mask"):
                assert len(entry[group][key]) == dim, (name, group, key)
            assert np.all(np.array(entry[group]["q01"]) <= np.array(entry[group]["q99"]))
        assert entry["action"]["mask"] == [True] * 6 + [False]
        episodes = EpisodeSource(oxe_dir, name)
        assert entry["num_transitions"] == sum(len(episodes[i]) for i in range(len(episodes)))
    bridge = many["datasets"]["bridge"]["proprio"]["mask"]
    assert bridge == [True] * 6 + [False, False]  # gripper and padding stay raw
    path = str(tmp_path / "stats.json")
    stats_lib.save_stats(many, path)
    assert stats_lib.load_stats(path) == many
    many["datasets"]["bridge"]["action"]["q01"] = [0.0] * 6
    with open(path, "w") as f:
        json.dump(many, f)
    with pytest.raises(ValueError, match="bridge/action/q01 has 6 values, expected 7"):
        stats_lib.load_stats(path)


def test_normalize_leaves_masked_dims():
    group = {"q01": [-2.0, 0.0], "q99": [2.0, 1.0], "mean": [0.0, 0.5], "std": [1.0, 0.25], "mask": [True, False]}
    values = np.array([[1.0, 0.3], [5.0, 1.0]], np.float32)
    np.testing.assert_allclose(stats_lib.normalize(values, group, "bounds"), [[0.5, 0.3], [1.0, 1.0]])
    np.testing.assert_allclose(stats_lib.normalize(values, group, "normal"), [[1.0, 0.3], [5.0, 1.0]])


def test_clip_starts_cover_the_episode():
    starts = [windowing.clip_start(40, 9, 2, slot, 4, 0.0) for slot in range(4)]
    assert starts == [0, 6, 12, 18]  # 40 - 17 + 1 = 24 valid starts in 4 strata
    assert windowing.clip_start(10, 9, 2, 3, 4, 0.99) == 0  # shorter than one clip: start 0, padded
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        windowing.check_num_frames(8)


def test_num_clip_actions_decouples_the_action_horizon_from_the_frame_stride():
    assert windowing.num_clip_actions(9, 2) == 8  # one per frame transition
    assert windowing.num_clip_actions(33, 3, 24) == 96  # DreamZero: 4 chunks of 24 steps, every 3rd frame kept
    assert windowing.num_clip_actions(9, 1, 4) == 8
    assert windowing.num_clip_actions(33, 3, 12) == 96  # 8 chunks of one latent frame
    for frames, stride, horizon in ((33, 3, 25), (33, 2, 24), (33, 3, 18), (21, 3, 24)):
        with pytest.raises(ValueError, match=f"data.action_horizon={horizon} with data.frame_stride={stride}"):
            windowing.num_clip_actions(frames, stride, horizon)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        windowing.num_clip_actions(32, 3, 24)


def test_action_horizon_keeps_every_step_action(oxe_dir):
    source = EpisodeSource(oxe_dir, "bridge")
    episode = source[0]
    stats = stats_lib.compute_stats(oxe_dir, ["bridge"])["datasets"]["bridge"]
    common = dict(resolution=(16, 16), dataset_stats=stats, proprio_dim=8, action_normalization="bounds",
                  dataset_index=0, wrist_camera=False)
    clip = windowing.make_clip(episode, 1, num_frames=5, frame_stride=3, action_horizon=12, **common)
    assert clip["frames"].shape[0] == 5 and clip["actions"].shape == (12, 7)
    expected = stats_lib.normalize(episode.actions[1:13].astype(np.float32), stats["action"], "bounds")
    valid = clip["action_mask"]
    np.testing.assert_allclose(clip["actions"][valid], expected[valid], rtol=1e-5)
    assert valid.tolist() == [1 + j + 1 < len(episode) for j in range(12)]
    np.testing.assert_array_equal(clip["frames"][1], episode.decode_frame(4, (16, 16)))
    # At stride 1 the per-step actions are the per-transition ones.
    per_step = windowing.make_clip(episode, 0, num_frames=5, frame_stride=1, action_horizon=4, **common)
    per_frame = windowing.make_clip(episode, 0, num_frames=5, frame_stride=1, **common)
    np.testing.assert_allclose(per_step["actions"], per_frame["actions"], rtol=1e-6)


def test_one_state_per_chunk_is_the_state_its_actions_start_from(oxe_dir):
    episode = EpisodeSource(oxe_dir, "bridge")[0]
    stats = stats_lib.compute_stats(oxe_dir, ["bridge"])["datasets"]["bridge"]
    common = dict(num_frames=9, frame_stride=2, resolution=(16, 16), dataset_stats=stats, proprio_dim=8,
                  action_normalization="bounds", dataset_index=0, wrist_camera=False)
    clip = windowing.make_clip(episode, 1, proprio_chunk_frames=4, **common)
    # Chunks: frame 0 | frames 1-4 | frames 5-8. Chunk k's state is at the last frame of chunk k - 1: frames 0,
    # 0, 4, i.e. steps 1, 1, 9 at stride 2.
    raw = np.zeros((3, 8), np.float32)
    for k, step in enumerate((1, 1, 9)):
        raw[k, : episode.proprio.shape[-1]] = episode.proprio[step]
    expected = stats_lib.normalize(raw, stats["proprio"], "normal")
    assert clip["proprio"].shape == (3, 8)
    np.testing.assert_allclose(clip["proprio"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(clip["proprio"][2], clip["proprio"][1])
    # One state per clip (the default) is chunk 0's.
    np.testing.assert_allclose(windowing.make_clip(episode, 1, **common)["proprio"], expected[0], rtol=1e-6)
    with pytest.raises(ValueError, match="data.proprio_chunk_frames=3"):
        windowing.make_clip(episode, 1, proprio_chunk_frames=3, **common)
    # The synthetic source's states are the block's position at the same frames; video-only clips carry zeros.
    synthetic = SyntheticClip(9, (16, 16), 8, seed=0, proprio_chunk_frames=4)(0)
    single = SyntheticClip(9, (16, 16), 8, seed=0)(0)
    assert synthetic["proprio"].shape == (3, 8) and single["proprio"].shape == (8,)
    np.testing.assert_array_equal(synthetic["proprio"][0], single["proprio"])
    np.testing.assert_array_equal(synthetic["proprio"][1], single["proprio"])
    assert not np.allclose(synthetic["proprio"][2, :2], single["proprio"][:2])
    png = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png, format="PNG")
    record = {"frames": [png.getvalue()] * 9, "caption": "a video", "clip_index": 0, "source": "v"}
    video_only = ClipToExample(num_frames=9, resolution=(16, 16), num_states=3)(record)
    assert video_only["proprio"].shape == (3, 8) and not video_only["proprio"].any()
    assert not video_only["has_actions"]


def test_clip_alignment_and_padding(oxe_dir):
    source = EpisodeSource(oxe_dir, "bridge")
    episode = source[0]
    stats = stats_lib.compute_stats(oxe_dir, ["bridge"])["datasets"]["bridge"]
    length = len(episode)
    start = length - 7  # with stride 2, frames at start, +2, +4, +6 exist; 5 frames pad
    clip = windowing.make_clip(
        episode,
        start,
        num_frames=9,
        frame_stride=2,
        resolution=(16, 16),
        dataset_stats=stats,
        proprio_dim=8,
        action_normalization="bounds",
        dataset_index=3,
        wrist_camera=False,
    )
    assert clip["frame_mask"].tolist() == [True] * 4 + [False] * 5
    assert clip["action_mask"].tolist() == [True] * 3 + [False] * 5
    np.testing.assert_array_equal(clip["frames"][4], clip["frames"][3])  # last real frame repeated
    np.testing.assert_array_equal(clip["frames"][8], clip["frames"][3])
    assert np.all(clip["actions"][3:] == 0)
    expected = episode.actions[start + 2 : start + 4].mean(0)
    expected[6] = episode.actions[start + 3, 6]
    expected = stats_lib.normalize(expected, stats["action"], "bounds")
    np.testing.assert_allclose(clip["actions"][1], expected, rtol=1e-5)
    np.testing.assert_array_equal(clip["frames"][1], episode.decode_frame(start + 2, (16, 16)))
    assert clip["instruction"] == episode.instruction and clip["dataset_index"] == 3
    assert clip["proprio"].shape == (8,) and clip["proprio"][7] == 0


def test_convert_tfrecord_to_array_record(tmp_path):
    src, dst = str(tmp_path / "tfrecord"), str(tmp_path / "array_record")
    make_oxe_like.make_datasets(src, ["bridge"], episodes=2, seed=3, image_size=(16, 16), file_format="tfrecord")
    with pytest.raises(ValueError, match="Convert it once"):
        EpisodeSource(src, "bridge")
    assert convert(src, dst) == ["bridge"]
    converted = EpisodeSource(dst, "bridge")
    original = tfds.builder_from_directory(os.path.join(src, "bridge", "0.1.0")).as_dataset(split="train")
    lengths = sorted(int(ex["steps"].cardinality()) for ex in original)
    assert sorted(len(converted[i]) for i in range(len(converted))) == lengths


def test_command_lines(tmp_path):
    def run(*args):
        result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    out, stats_path = str(tmp_path / "oxe"), str(tmp_path / "stats.json")
    run("data_pipelines.make_oxe_like", f"--out={out}", "--datasets=bridge,droid", "--episodes=2", "--image_size=16,20")
    assert EpisodeSource(out, "droid")[0].image_shape == (16, 20, 3)
    printed = run("data_pipelines.compute_stats", f"--data_dir={out}", "--datasets=bridge,droid", f"--out={stats_path}")
    assert "droid: 2 episodes" in printed
    assert sorted(stats_lib.load_stats(stats_path)["datasets"]) == ["bridge", "droid"]
