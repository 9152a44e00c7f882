"""Truncated (half-copied) ArrayRecord shards: named at open with dataset and file, or skipped and counted."""

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from train_utils import get_config

from data_pipelines import config as config_lib
from data_pipelines import make_oxe_like, pipeline
from data_pipelines.sources import shards
from data_pipelines.sources import video as video_source
from data_pipelines.sources.rlds import EpisodeSource
from data_pipelines.sources.shards import BadShardError
from data_pipelines.standardize import stats as stats_lib
from wamjax.stages import stage_spec
from wamjax.train import inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_SHARD = 1  # of 3 shards holding 2 episodes each


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """(clean dir, dir with shard BAD_SHARD of bridge truncated, that shard's path)."""
    clean = str(tmp_path_factory.mktemp("oxe_clean"))
    make_oxe_like.make_datasets(clean, ["bridge"], episodes=6, seed=3, image_size=(16, 20), num_shards=3)
    bad = str(tmp_path_factory.mktemp("oxe_bad") / "oxe")
    shutil.copytree(clean, bad)
    path = EpisodeSource(bad, "bridge").filenames[BAD_SHARD]
    _truncate(path)
    return clean, bad, path


def _config(data_dir, **overrides):
    config = config_lib.get_data_config()
    config.update(data_dir=data_dir, datasets="bridge", resolution=(8, 8), num_frames=5, batch_size=4)
    config.update(overrides)
    return config


def test_truncated_shard_is_named_at_open(datasets):
    _, bad, path = datasets
    for open_dataset in (
        lambda: EpisodeSource(bad, "bridge"),
        lambda: stats_lib.compute_stats(bad, ["bridge"]),
        lambda: pipeline.make_dataset(_config(bad, stats_path="")),
    ):
        with pytest.raises(BadShardError) as info:
            open_dataset()
        message = str(info.value)
        assert "dataset 'bridge'" in message and path in message and "truncated" in message, message
        assert "data.skip_bad_records=True" in message
        assert (info.value.dataset, info.value.filename) == ("bridge", path)


def test_truncated_shard_skipped_counted_and_excluded(datasets):
    clean, bad, path = datasets
    before = shards.bad_shard_counts().get("bridge", 0)
    source = EpisodeSource(bad, "bridge", skip_bad_shards=True)
    assert shards.bad_shard_counts()["bridge"] == before + 1
    assert [e.filename for e in source.bad_shards] == [path]
    assert len(source) == 4 and path not in source.filenames
    # The episodes of the other shards read back unchanged, in order.
    full = EpisodeSource(clean, "bridge")
    kept = [i for i in range(len(full)) if i // 2 != BAD_SHARD]
    for index, full_index in enumerate(kept):
        np.testing.assert_array_equal(source[index].actions, full[full_index].actions)

    stats = stats_lib.compute_stats(bad, ["bridge"], skip_bad_records=True)["datasets"]["bridge"]
    assert stats["num_episodes"] == 4 and stats["skipped_shards"] == [os.path.basename(path)]
    assert stats["num_transitions"] == sum(len(full[i]) for i in kept)
    kept_actions = np.concatenate([full[i].actions for i in kept])
    np.testing.assert_allclose(stats["action"]["mean"], kept_actions.mean(0), rtol=1e-5, atol=1e-6)

    # Training's input runs over the remaining shards; its normalization stats come from them too.
    iterator = pipeline.make_iterator(_config(bad, skip_bad_records=True))
    batches = [next(iterator) for _ in range(3)]
    assert all(b["frames"].shape == (4, 5, 8, 8, 3) for b in batches)
    assert all(np.all(np.abs(b["actions"]) <= 1.0) for b in batches)


def test_dataset_without_a_readable_shard_fails_even_when_skipping(tmp_path):
    make_oxe_like.make_datasets(str(tmp_path), ["bridge"], episodes=1, seed=0, image_size=(16, 20))
    path = EpisodeSource(str(tmp_path), "bridge").filenames[0]
    _truncate(path)
    with pytest.raises(BadShardError, match="none of the dataset's 1 shards is readable"):
        EpisodeSource(str(tmp_path), "bridge", skip_bad_shards=True)


def test_inspect_cli_reports_bad_shard(datasets):
    _, bad, path = datasets
    run = lambda *flags: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "data_pipelines.inspect", f"--data_dir={bad}", "--nodecode_frames", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    failed = run()
    assert failed.returncode == 1
    assert f"Unreadable shard of dataset 'bridge', file {path}: not a readable ArrayRecord file" in failed.stderr
    skipped = run("--skip_bad_records")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "bridge: 4 episodes" in skipped.stdout and "skipped 1 unreadable shards" in skipped.stdout


def _write_video_shards(out: str, num_shards: int = 3, clips_per_shard: int = 2) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="JPEG")
    for shard in range(num_shards):
        writer = ArrayRecordWriter(
            os.path.join(out, video_source.shard_name(shard, num_shards)), video_source.ARRAY_RECORD_WRITER_OPTIONS
        )
        for clip in range(clips_per_shard):
            writer.write(
                video_source.pack_clip_record(
                    frames=[buffer.getvalue()] * 5, image_format="jpeg", height=8, width=8,
                    caption=f"shard {shard}", source=f"video{shard}.mp4", clip_index=clip,
                    start_time=0.0, frame_times=[0.0] * 5, fps=8.0,
                )
            )  # fmt: skip
        writer.close()


def test_truncated_video_shard_named_or_skipped(tmp_path):
    _write_video_shards(str(tmp_path))
    path = str(tmp_path / video_source.shard_name(BAD_SHARD, 3))
    _truncate(path)
    with pytest.raises(BadShardError) as info:
        video_source.make_video_dataset(str(tmp_path), num_frames=5, resolution=(8, 8), seed=0)
    assert "dataset 'captioned_video'" in str(info.value) and path in str(info.value)

    before = shards.bad_shard_counts().get(video_source.DATASET_NAME, 0)
    dataset = video_source.make_video_dataset(
        str(tmp_path), num_frames=5, resolution=(8, 8), seed=0, skip_bad_shards=True
    )
    captions = sorted(str(example["instruction"]) for example in dataset)
    assert captions == ["shard 0", "shard 0", "shard 2", "shard 2"]
    assert shards.bad_shard_counts()[video_source.DATASET_NAME] == before + 1


def test_training_input_skips_bad_oxe_and_video_shards(datasets, tmp_path):
    _, bad, _ = datasets
    _write_video_shards(str(tmp_path))
    _truncate(str(tmp_path / video_source.shard_name(BAD_SHARD, 3)))
    config = get_config("size=tiny,stage=video_pretrain,data=oxe")
    config.data.update(
        data_dir=bad, datasets="bridge", resolution=(8, 8), num_frames=5, batch_size=4, stats_path="",
        video_shards=str(tmp_path), video_weight=1.0,
    )  # fmt: skip
    with pytest.raises(BadShardError, match="dataset 'bridge'"):
        inputs.make_stage_dataset(stage_spec(config, "video_pretrain"), 0, 1)
    config.data.skip_bad_records = True
    before = shards.bad_shard_counts()
    dataset, stats = inputs.make_stage_dataset(stage_spec(config, "video_pretrain"), 0, 1)
    assert stats["datasets"]["bridge"]["num_episodes"] == 4
    iterator = iter(dataset)
    batches = [next(iterator) for _ in range(4)]
    assert all(b["frames"].shape == (4, 5, 8, 8, 3) for b in batches)
    # Both sources feed the batches: bridge (index 0) and the surviving video shards (index 1).
    assert set(np.concatenate([b["dataset_index"] for b in batches])) == {0, 1}
    after = shards.bad_shard_counts()
    assert after["bridge"] > before.get("bridge", 0)
    assert after[video_source.DATASET_NAME] == before.get(video_source.DATASET_NAME, 0) + 1
