"""LeRobot datasets (v3.0 and v2.1) read through the pipeline's own reader: what the LeRobot library wrote reads back
exactly (actions, states) and within the codec's loss (frames), mixes with RLDS datasets, and bad files are named."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from train_utils import REPO, subprocess_env

from data_pipelines import config as data_config_lib
from data_pipelines import inspect as inspect_lib
from data_pipelines import make_lerobot, make_oxe_like, pipeline
from data_pipelines.clips import windowing
from data_pipelines.sources import lerobot
from data_pipelines.sources.rlds import BadRecordError
from data_pipelines.sources.shards import BadShardError
from data_pipelines.standardize import stats as stats_lib

FIXTURES = os.path.join(REPO, "tests", "fixtures", "lerobot")
_spec = importlib.util.spec_from_file_location("lerobot_fixture_content", os.path.join(FIXTURES, "content.py"))
content = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(content)
MIN_PSNR = 30.0


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _check_against_content(root: str, codec: str) -> None:
    info = lerobot.read_info(root)
    assert info["codebase_version"] == "v3.0"
    assert {info["features"][c]["info"]["video.codec"] for c in content.CAMERAS} == {codec}
    # Several episodes share each data and video file (the v3.0 layout).
    assert len(os.listdir(os.path.join(root, "data", "chunk-000"))) < len(content.LENGTHS)
    for index in range(len(content.LENGTHS)):
        got, want = lerobot.read_episode(root, index), content.episode(index)
        np.testing.assert_array_equal(got["action"], want["action"])
        np.testing.assert_array_equal(got["state"], want["state"])
        assert got["instruction"] == want["task"]
        np.testing.assert_allclose(got["timestamp"], np.arange(content.LENGTHS[index]) / content.FPS, atol=1e-6)
        for camera in content.CAMERAS:
            assert got["images"][camera].shape == want["images"][camera].shape
            worst = min(_psnr(g, w) for g, w in zip(got["images"][camera], want["images"][camera], strict=True))
            assert worst >= MIN_PSNR, (root, index, camera, worst)
            # The right frame, not its neighbour: each frame is closer to its own source frame than to the next.
            g, w = got["images"][camera], want["images"][camera]
            assert all(_psnr(g[t], w[t]) > _psnr(g[t], w[t + 1]) for t in range(len(w) - 1))


@pytest.mark.parametrize("codec", ["h264", "av1"])
def test_fixture_written_by_the_lerobot_library_reads_back(codec):
    _check_against_content(os.path.join(FIXTURES, f"v3_{codec}"), codec)


def test_the_lerobot_library_in_its_own_venv_writes_what_the_reader_reads(tmp_path):
    """Writes the fixtures anew with the pinned LeRobot library (its torch and torchvision apart from ours)."""
    venv = os.path.join(REPO, ".venv-lerobot")
    subprocess.run(["bash", os.path.join(REPO, "launch", "setup_lerobot_venv.sh")], check=True, timeout=900,
                   env={**os.environ, "LEROBOT_VENV": venv, "PYTHON": sys.executable})
    result = subprocess.run([os.path.join(venv, "bin", "python"), os.path.join(FIXTURES, "make_fixture.py"),
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for codec in ("h264", "av1"):
        _check_against_content(str(tmp_path / f"v3_{codec}"), codec)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same synthetic episodes in both layouts, as `make_lerobot` writes them."""
    root = tmp_path_factory.mktemp("lerobot")
    episodes = make_lerobot.synthetic_episodes(5, seed=1, image_size=(48, 64), min_steps=12, max_steps=20)
    for version in ("v3.0", "v2.1"):
        make_lerobot.write_dataset(str(root / version), episodes, version=version, episodes_per_file=2)
    return root, episodes


def test_v21_and_v30_layouts_read_the_same_episodes(written):
    root, episodes = written
    assert os.path.exists(root / "v2.1" / "meta" / "episodes.jsonl")
    assert os.path.exists(root / "v3.0" / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    for index, episode in enumerate(episodes):
        v21, v30 = lerobot.read_episode(str(root / "v2.1"), index), lerobot.read_episode(str(root / "v3.0"), index)
        np.testing.assert_array_equal(v21["action"], episode["action"])
        np.testing.assert_array_equal(v30["action"], episode["action"])
        for camera in make_lerobot.CAMERAS:
            # The sharp-edged synthetic scene loses ~2 dB more than the fixture's to 4:2:0 chroma subsampling.
            for layout in (v21, v30):
                frames = layout["images"][camera]
                assert frames.shape == episode["images"][camera].shape
                assert min(_psnr(a, b) for a, b in zip(frames, episode["images"][camera], strict=True)) > 25


def test_hevc_videos_read_back_too(tmp_path):
    episodes = make_lerobot.synthetic_episodes(2, seed=4, image_size=(48, 64), min_steps=10, max_steps=12)
    make_lerobot.write_dataset(str(tmp_path / "hevc"), episodes, codec="hevc")
    info = lerobot.read_info(str(tmp_path / "hevc"))
    assert info["features"][make_lerobot.CAMERAS[0]]["info"]["video.codec"] == "hevc"
    for index, episode in enumerate(episodes):
        got = lerobot.read_episode(str(tmp_path / "hevc"), index)
        np.testing.assert_array_equal(got["action"], episode["action"])
        frames, want = got["images"][make_lerobot.CAMERAS[0]], episode["images"][make_lerobot.CAMERAS[0]]
        assert min(_psnr(a, b) for a, b in zip(frames, want, strict=True)) > 25


def test_source_standardizes_and_decodes_at_the_clip_size(written):
    root, episodes = written
    source = lerobot.LeRobotSource(str(root), "lerobot:v3.0")
    assert len(source) == 5 and source.spec.wrist_camera == "observation.images.wrist_image"
    episode = source[3]
    np.testing.assert_array_equal(episode.actions, episodes[3]["action"])
    assert episode.instruction == episodes[3]["task"] and episode.has_wrist
    small = episode.decode_frame(4, (24, 32))
    assert small.shape == (24, 32, 3) and small.dtype == np.uint8
    full = episode.decode_frame(4, None, wrist=True)
    assert _psnr(full, episodes[3]["images"][make_lerobot.CAMERAS[1]][4]) > 25
    episode.close()
    # Picklable, as Grain workers need.
    import pickle

    again = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(again[3].actions, episode.actions)


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mix"))
    make_oxe_like.make_datasets(root, ["taco_play"], episodes=4, seed=0, image_size=(48, 64))
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), os.path.join(root, "fixture"))
    names = ["taco_play", "lerobot:fixture"]
    stats_lib.save_stats(stats_lib.compute_stats(root, names), os.path.join(root, "stats.json"))
    return root


def _data_config(root, **overrides):
    config = data_config_lib.get_data_config()
    config.data_dir = root
    config.datasets = "taco_play,lerobot:fixture"
    config.stats_path = os.path.join(root, "stats.json")
    config.batch_size = 4
    config.num_frames = 5
    config.clips_per_episode = 2
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_stats_of_a_lerobot_dataset_are_its_stored_values(mixture_dir):
    stats = stats_lib.load_stats(os.path.join(mixture_dir, "stats.json"))
    entry = stats["datasets"]["lerobot:fixture"]
    actions = np.concatenate([content.episode(i)["action"] for i in range(len(content.LENGTHS))])
    np.testing.assert_allclose(entry["action"]["mean"], actions.mean(0), rtol=1e-5, atol=1e-6)
    assert entry["num_episodes"] == len(content.LENGTHS) and entry["num_transitions"] == len(actions)


def test_lerobot_and_rlds_in_one_mixture_resume_exactly(mixture_dir):
    config = _data_config(mixture_dir, cameras="primary,wrist", view_layout="tokens")
    iterator = pipeline.make_iterator(config)
    first = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    seen = np.concatenate([b["dataset_index"] for b in first + expected])
    assert set(seen.tolist()) == {0, 1}, "both datasets reach the batches"
    assert first[0]["frames"].shape == (4, 5, 2, 32, 32, 3)  # tokens layout: a views axis
    again = pipeline.make_iterator(config)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_grain_workers_decode_lerobot_clips_as_the_main_process_does(mixture_dir):
    config = _data_config(mixture_dir, datasets="lerobot:fixture", cameras="primary,wrist")
    inline = next(pipeline.make_iterator(config))
    config.worker_count = 1
    worker = next(pipeline.make_iterator(config))
    for key in ("frames", "actions", "proprio", "dataset_index"):
        np.testing.assert_array_equal(worker[key], inline[key], err_msg=key)


def test_clip_frames_are_the_episode_frames_at_their_steps(mixture_dir):
    config = _data_config(mixture_dir, datasets="lerobot:fixture", shuffle=False, resolution=(48, 64),
                          clips_per_episode=1)
    batch = next(pipeline.make_iterator(config))
    # Slot k of an unshuffled pass is episode k's only clip, starting where clip_start puts it.
    for row in range(4):
        clip = batch["frames"][row]
        want = content.episode(row)["images"][content.CAMERAS[0]]
        scores = [np.mean([_psnr(clip[i], want[s + i]) for i in range(5)]) for s in range(len(want) - 4)]
        assert max(scores) >= MIN_PSNR


def test_inspect_reads_every_camera_and_names_bad_files(mixture_dir, tmp_path):
    summary = inspect_lib.inspect_dataset(mixture_dir, "lerobot:fixture")
    assert summary["episodes"] == 4 and summary["steps"] == sum(content.LENGTHS)
    assert "lerobot:fixture" in inspect_lib.available_datasets(mixture_dir)

    # A missing video file: named with the episode index; skipped and counted with skip_bad_records.
    root = tmp_path / "missing"
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), root)
    video = root / "videos" / content.CAMERAS[1] / "chunk-000" / "file-000.mp4"
    video.unlink()
    with pytest.raises(BadRecordError, match=r"file-000\.mp4.*record 0.*cannot open the video"):
        inspect_lib.inspect_dataset(str(tmp_path), "lerobot:missing")
    assert inspect_lib.inspect_dataset(str(tmp_path), "lerobot:missing", skip_bad_records=True)["bad_records"] == 4

    # A truncated video: the episodes past the cut fail, naming the file and the frame time.
    root = tmp_path / "truncated"
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), root)
    video = root / "videos" / content.CAMERAS[0] / "chunk-000" / "file-000.mp4"
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadRecordError, match=r"file-000\.mp4"):
        inspect_lib.inspect_dataset(str(tmp_path), "lerobot:truncated")

    # A timestamp past the end of the video.
    root = tmp_path / "late"
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), root)
    path = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    timestamps = table.column("timestamp").to_numpy().copy()
    timestamps[-1] = 99.0
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                    pa.array(timestamps, pa.float32())), path)
    with pytest.raises(BadRecordError, match=r"record 3: episode 3 step 8: .* 102\.4000 s.*outside the video"):
        inspect_lib.inspect_dataset(str(tmp_path), "lerobot:late")

    # A data file whose rows do not match the episode index.
    root = tmp_path / "rows"
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), root)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 2), root / "data" / "chunk-000" / "file-000.parquet")
    with pytest.raises(BadRecordError, match=r"file-000\.parquet, record 3: the parquet file holds 7 rows"):
        inspect_lib.inspect_dataset(str(tmp_path), "lerobot:rows")

    # A truncated data file is an unreadable shard.
    data_file = root / "data" / "chunk-000" / "file-000.parquet"
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(BadShardError, match=r"file-000\.parquet.*not a readable parquet file"):
        lerobot.LeRobotSource(str(tmp_path), "lerobot:rows")
    assert len(lerobot.LeRobotSource(str(tmp_path), "lerobot:rows", skip_bad_shards=True)) == 0


def test_inspect_cli_on_a_lerobot_dataset(mixture_dir):
    result = subprocess.run([sys.executable, "-m", "data_pipelines.inspect", f"--data_dir={mixture_dir}",
                             "--datasets=lerobot:fixture"], cwd=REPO, env=subprocess_env(1), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"lerobot:fixture: 4 episodes, {sum(content.LENGTHS)} steps, 2 unique instructions" in result.stdout


def _edit_info(root, edit):
    path = os.path.join(root, "meta", "info.json")
    with open(path) as f:
        info = json.load(f)
    edit(info)
    with open(path, "w") as f:
        json.dump(info, f)
    lerobot.read_info.cache_clear()


def test_bad_metadata_names_the_key_the_dataset_and_the_codec(tmp_path):
    root = tmp_path / "nostate"
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), root)
    _edit_info(root, lambda info: info["features"].pop("observation.state"))
    with pytest.raises(lerobot.LeRobotFormatError, match=r"'lerobot:nostate'.*no feature 'observation.state'"):
        lerobot.LeRobotSource(str(tmp_path), "lerobot:nostate")

    root = tmp_path / "codec"
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), root)
    _edit_info(root, lambda info: info["features"][content.CAMERAS[0]]["info"].update({"video.codec": "nocodec"}))
    with pytest.raises(lerobot.LeRobotFormatError, match=r"'observation.images.front' is encoded as 'nocodec'"):
        lerobot.LeRobotSource(str(tmp_path), "lerobot:codec")

    config = data_config_lib.get_data_config()
    config.data_dir, config.datasets, config.cameras = str(tmp_path / "x"), "lerobot:fixture", "overhead"
    shutil.copytree(os.path.join(FIXTURES, "v3_h264"), tmp_path / "x" / "fixture")
    with pytest.raises(ValueError, match=r"no camera 'overhead'; its cameras are \['observation.images.front'"):
        pipeline.make_dataset(config, stats={"datasets": {}})

    with pytest.raises(FileNotFoundError, match=r"No LeRobot dataset at .*nowhere"):
        lerobot.LeRobotSource(str(tmp_path), "lerobot:nowhere")


def test_idle_filter_drops_windows_where_the_robot_stands_still(tmp_path):
    episodes = make_lerobot.synthetic_episodes(3, seed=2, image_size=(24, 32), min_steps=24, max_steps=24)
    for episode in episodes:  # the robot stands still for the first half of every episode
        episode["action"][:12, :6] = 0.0
        episode["action"][:12, 6] = 1.0
    make_lerobot.write_dataset(str(tmp_path / "idle"), episodes)
    names = ["lerobot:idle"]
    stats = stats_lib.compute_stats(str(tmp_path), names)
    config = _data_config(str(tmp_path), datasets="lerobot:idle", idle_filter="lerobot:idle=1e-6",
                          clips_per_episode=4)
    source = lerobot.LeRobotSource(str(tmp_path), "lerobot:idle")
    loader = pipeline.ClipLoader(source, 0, stats["datasets"]["lerobot:idle"], config)
    kept = [loader(0, slot) for slot in range(3 * 4)]
    # Dropped exactly when the window's 4 actions all lie in the still half.
    u = np.random.default_rng([config.seed, 0, 0]).random()
    starts = [windowing.clip_start(24, 5, 1, slot % 4, 4, u) for slot in range(12)]
    assert [k is None for k in kept] == [start + 4 <= 12 for start in starts]
    assert 3 <= sum(k is None for k in kept) < 12
    assert pipeline.idle_window_counts()["lerobot:idle"] >= 3
    assert all(k["actions"].shape == (4, 7) for k in kept if k is not None)
    config.idle_filter = ""
    assert all(pipeline.ClipLoader(source, 0, stats["datasets"]["lerobot:idle"], config)(0, s) is not None
               for s in range(12))
    config.idle_filter = "lerobot:idle"
    with pytest.raises(ValueError, match=r"data.idle_filter='lerobot:idle': 'lerobot:idle' is not NAME=THRESHOLD"):
        pipeline.ClipLoader(source, 0, stats["datasets"]["lerobot:idle"], config)
    summary = inspect_lib.inspect_dataset(str(tmp_path), "lerobot:idle", decode_frames=False, idle_threshold=1e-6)
    assert summary["idle_steps"] == 3 * 12  # the still half of every episode, step by step
    text = inspect_lib.format_summary(summary)
    assert "idle steps (every movement below 1e-06, grippers unchanged): 36 of 72" in text
    assert pipeline.idle_threshold(_data_config("", idle_filter="*=0.5,bridge=0.1"), "bridge") == 0.1
    assert pipeline.idle_threshold(_data_config("", idle_filter="*=0.5,bridge=0.1"), "lerobot:x") == 0.5


def test_quantile_normalization_is_openpis_q01_q99(mixture_dir):
    stats = stats_lib.load_stats(os.path.join(mixture_dir, "stats.json"))["datasets"]["lerobot:fixture"]["action"]
    actions = content.episode(0)["action"]
    quantile = stats_lib.normalize(actions, stats, "quantile")
    np.testing.assert_array_equal(quantile, stats_lib.normalize(actions, stats, "bounds"))
    low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    want = np.clip(2 * (actions - low) / (high - low) - 1, -1, 1)
    np.testing.assert_allclose(quantile[:, :6], want[:, :6], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats_lib.unnormalize(quantile, stats, "quantile")[:, :6],
                               np.clip(actions, low, high)[:, :6], rtol=1e-4, atol=1e-5)


def test_a_latents_cache_of_a_lerobot_mixture_keeps_its_clips(mixture_dir, tmp_path):
    from train_utils import get_config

    from data_pipelines.sources.latents import LatentsCacheSource
    from wamjax.jobs.encode_latents import encode_run_cache

    config = get_config("size=tiny,stage=action_tune,data=oxe")
    config.data.update(data_dir=mixture_dir, datasets="taco_play,lerobot:fixture",
                       stats_path=os.path.join(mixture_dir, "stats.json"), num_frames=5, batch_size=4)
    written = encode_run_cache(config, str(tmp_path / "latents"), num_batches=2)
    assert written == 8
    cache = LatentsCacheSource(str(tmp_path / "latents"))
    examples = [cache[i] for i in range(len(cache))]
    assert {int(e["dataset_index"]) for e in examples} <= {0, 1} and len(examples) == 8
    assert all(e["action_dim_mask"].all() and e["actions"].shape == (4, 7) for e in examples)
