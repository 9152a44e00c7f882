"""The OXE Grain pipeline: batch contract, mixture proportions, sharding, exact resume, global arrays."""

import json
import os
import subprocess
import sys
import textwrap
import zlib

import grain
import numpy as np
import pytest

from data_pipelines import config as config_lib
from data_pipelines import make_oxe_like, pipeline
from data_pipelines.clips import mixture, views
from data_pipelines.standardize import stats as stats_lib

DATASETS = ["fractal20220817_data", "bridge", "taco_play", "droid"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def oxe(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("oxe_pipeline"))
    make_oxe_like.make_datasets(out, DATASETS, episodes=4, seed=1, image_size=(24, 32))
    stats_path = os.path.join(out, "stats.json")
    stats_lib.save_stats(stats_lib.compute_stats(out, DATASETS), stats_path)
    return out, stats_path


def _config(oxe, **overrides):
    data_dir, stats_path = oxe
    config = config_lib.get_data_config()
    config.data_dir = data_dir
    config.stats_path = stats_path
    config.resolution = (16, 16)
    config.num_frames = 5
    config.update(overrides)
    return config


def _ids(batch):
    """Content hash of each example, to compare streams."""
    return [
        zlib.crc32(batch["frames"][i].tobytes() + batch["actions"][i].tobytes() + bytes([batch["dataset_index"][i]]))
        for i in range(len(batch["frames"]))
    ]


def test_batch_contract(oxe):
    config = _config(oxe, batch_size=8)
    batch = next(pipeline.make_iterator(config))
    assert batch["frames"].shape == (8, 5, 16, 16, 3) and batch["frames"].dtype == np.uint8
    assert batch["frame_mask"].shape == (8, 5) and batch["frame_mask"].dtype == bool
    assert batch["actions"].shape == (8, 4, 7) and batch["actions"].dtype == np.float32
    assert batch["action_mask"].shape == (8, 4) and batch["action_mask"].dtype == bool
    assert batch["proprio"].shape == (8, 8) and batch["proprio"].dtype == np.float32
    assert batch["instruction"].dtype.kind == "U" and batch["instruction"].shape == (8,)
    assert batch["dataset_index"].dtype == np.int32 and set(batch["dataset_index"]) == {0, 1, 2, 3}
    assert "wrist_frames" not in batch
    assert np.all(np.abs(batch["actions"][..., :6]) <= 1.0)  # "bounds" normalization
    assert set(np.unique(batch["actions"][..., 6])) <= {0.0, 1.0}  # gripper left raw
    # One state per chunk of 4 frames (chunk-causal models): frames 0 | 1-4 -> two states, both at frame 0.
    per_chunk = next(pipeline.make_iterator(_config(oxe, batch_size=8, proprio_chunk_frames=4)))
    assert per_chunk["proprio"].shape == (8, 2, 8)
    np.testing.assert_array_equal(per_chunk["proprio"][:, 0], per_chunk["proprio"][:, 1])


def test_wrist_camera(oxe):
    config = _config(oxe, datasets="taco_play,droid", wrist_camera=True, batch_size=4)
    batch = next(pipeline.make_iterator(config))
    assert batch["wrist_frames"].shape == (4, 5, 16, 16, 3)
    assert not np.array_equal(batch["wrist_frames"], batch["frames"])
    with pytest.raises(ValueError, match="has no wrist camera"):
        next(pipeline.make_iterator(_config(oxe, datasets="bridge", wrist_camera=True, batch_size=4)))


def test_cameras_tile_and_tokens(oxe):
    """data.cameras decodes any cameras of a dataset: tiled into one frame, or kept as a views axis."""
    cameras = "exterior_image_1_left,exterior_image_2_left,wrist"
    tokens = next(pipeline.make_iterator(
        _config(oxe, datasets="droid", cameras=cameras, view_layout="tokens", batch_size=2, shuffle=False)
    ))
    assert tokens["frames"].shape == (2, 5, 3, 16, 16, 3)
    assert not np.array_equal(tokens["frames"][:, :, 0], tokens["frames"][:, :, 1])  # exterior 1 vs 2
    primary = next(pipeline.make_iterator(_config(oxe, datasets="droid", batch_size=2, shuffle=False)))
    np.testing.assert_array_equal(tokens["frames"][:, :, 0], primary["frames"])
    # Three 8x8 views tile a 2x2 grid of a 16x16 frame, the fourth cell black.
    tiled = next(pipeline.make_iterator(
        _config(oxe, datasets="droid", cameras=cameras, view_layout="tile", batch_size=2, shuffle=False)
    ))
    assert tiled["frames"].shape == (2, 5, 16, 16, 3)
    assert np.all(tiled["frames"][:, :, 8:, 8:] == 0) and tiled["frames"][:, :, 8:, :8].max() > 0
    small = next(pipeline.make_iterator(_config(
        oxe, datasets="droid", cameras=cameras, view_layout="tokens", resolution=(8, 8), batch_size=2, shuffle=False
    )))
    np.testing.assert_array_equal(tiled["frames"], views.tile_views(small["frames"]))
    # Roles resolve per dataset: taco_play's wrist camera is rgb_gripper.
    taco = next(pipeline.make_iterator(
        _config(oxe, datasets="taco_play,droid", cameras="primary,wrist", view_layout="tokens", batch_size=4)
    ))
    assert taco["frames"].shape == (4, 5, 2, 16, 16, 3)


def test_missing_camera_named(oxe):
    with pytest.raises(ValueError, match=r"dataset 'bridge' has no camera 'wrist'; its cameras are \['image'\]"):
        pipeline.make_iterator(_config(oxe, datasets="droid,bridge", cameras="primary,wrist", batch_size=4))
    with pytest.raises(ValueError, match="data.view_layout='stack'"):
        pipeline.make_iterator(_config(oxe, datasets="droid", cameras="primary,wrist", view_layout="stack"))


def test_mixture_proportions(oxe):
    config = _config(oxe, datasets="bridge,droid", weights=(3.0, 1.0), batch_size=16, resolution=(8, 8))
    iterator = pipeline.make_iterator(config)
    counts = np.bincount(np.concatenate([next(iterator)["dataset_index"] for _ in range(10)]), minlength=2)
    assert abs(counts[0] / counts.sum() - 0.75) < 0.05, counts


def test_balance_weights_use_transitions(oxe):
    stats = stats_lib.load_stats(oxe[1])
    weights = mixture.mixture_weights(["bridge", "droid"], (), True, stats)
    sizes = [stats["datasets"][n]["num_transitions"] for n in ("bridge", "droid")]
    np.testing.assert_allclose(weights, np.array(sizes) / sum(sizes))
    with pytest.raises(ValueError, match="2 datasets"):
        mixture.mixture_weights(["bridge", "droid"], (1.0,), False)


def test_processes_see_disjoint_examples(oxe):
    config = _config(oxe, batch_size=8, resolution=(8, 8))
    whole = pipeline.make_iterator(config)
    whole_ids = [i for _ in range(4) for i in _ids(next(whole))]
    shards = []
    for process_index in range(2):
        iterator = pipeline.make_iterator(config, process_index=process_index, process_count=2)
        batches = [next(iterator) for _ in range(4)]
        assert batches[0]["frames"].shape[0] == 4
        shards.append([i for b in batches for i in _ids(b)])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0][:8] + shards[1][:8]) == sorted(whole_ids[:16])


def test_exact_resume_in_process(oxe):
    config = _config(oxe, batch_size=4, resolution=(8, 8))
    iterator = pipeline.make_iterator(config)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = pipeline.make_iterator(config)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_exact_resume_in_a_new_process(oxe, tmp_path):
    config = _config(oxe, batch_size=4, resolution=(8, 8), datasets="bridge,taco_play")
    iterator = pipeline.make_iterator(config)
    for _ in range(2):
        next(iterator)
    state_path = tmp_path / "state.json"
    state_path.write_text(json.dumps(iterator.get_state(), default=str))
    expected = [_ids(next(iterator)) for _ in range(2)]
    script = textwrap.dedent(
        f"""
        import json
        from data_pipelines import config as config_lib, pipeline
        from tests.test_data_pipeline import _ids
        config = config_lib.get_data_config()
        config.update(json.loads({json.dumps(json.dumps(config.to_dict()))}))
        iterator = pipeline.make_iterator(config)
        iterator.set_state(json.loads(open({str(state_path)!r}).read()))
        print("IDS", json.dumps([_ids(next(iterator)) for _ in range(2)]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("IDS ")][0]
    assert json.loads(line[4:]) == expected


def test_worker_processes_resume_exactly(oxe):
    config = _config(oxe, batch_size=4, resolution=(8, 8), datasets="bridge,droid", worker_count=2)
    iterator = pipeline.make_iterator(config)
    first = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    expected = [_ids(next(iterator)) for _ in range(2)]
    restored = pipeline.make_iterator(config)
    restored.set_state(state)
    assert [_ids(next(restored)) for _ in range(2)] == expected
    # Workers decode the same stream as in-process decoding, only the batch order may interleave.
    in_process = pipeline.make_iterator(_config(oxe, batch_size=4, resolution=(8, 8), datasets="bridge,droid"))
    reference = {i for _ in range(8) for i in _ids(next(in_process))}
    assert {i for b in first for i in _ids(b)} <= reference


def test_extra_sources_join_the_mixture(oxe):
    config = _config(oxe, datasets="bridge", batch_size=8, resolution=(8, 8))
    video = {
        "frames": np.zeros((5, 8, 8, 3), np.uint8),
        "frame_mask": np.ones(5, bool),
        "actions": np.zeros((4, 7), np.float32),
        "action_mask": np.zeros(4, bool),
        "action_dim_mask": np.ones(7, bool),
        "has_actions": np.bool_(False),
        "proprio": np.zeros(8, np.float32),
        "instruction": np.str_("a captioned video"),
        "dataset_index": np.int32(1),
    }
    extra = grain.MapDataset.source([video] * 10).repeat()
    dataset = pipeline.make_dataset(config, extra_sources=[(extra, 1.0)])
    batch = next(iter(dataset))
    assert sorted(set(batch["dataset_index"].tolist())) == [0, 1]
    assert "a captioned video" in batch["instruction"].tolist()
    # Robot clips train their actions, the video-only ones not (the step masks their action loss).
    np.testing.assert_array_equal(batch["has_actions"], batch["dataset_index"] == 0)
