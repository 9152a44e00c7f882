"""Bad OXE records: errors name dataset, file and record; skip_bad_records skips, counts and logs."""

import io
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from data_pipelines import config as config_lib
from data_pipelines import make_oxe_like, pipeline
from data_pipelines.sources import rlds as rlds_source
from data_pipelines.sources.rlds import BadRecordError, EpisodeSource
from data_pipelines.standardize import stats as stats_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_INDEX = 2


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("oxe_clean"))
    make_oxe_like.make_datasets(out, ["bridge"], episodes=4, seed=2, image_size=(16, 20))
    return out, stats_lib.compute_stats(out, ["bridge"])


def _truncate(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _garble(raw: bytes) -> bytes:
    return raw[:10] + bytes(255 - b for b in raw[10:60]) + raw[60:]


def _edit(fn):
    def edit(raw: bytes) -> bytes:
        example = tf_example_pb2.Example.FromString(raw)
        fn(example.features.feature)
        return example.SerializeToString()

    return edit


def _drop_state(feature):
    del feature["steps/observation/state"]


def _wrong_image_shape(feature):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(buffer, format="JPEG")
    feature["steps/observation/image"].bytes_list.value[3] = buffer.getvalue()


def _nan_action(feature):
    feature["steps/action/world_vector"].float_list.value[4] = float("nan")


CASES = {
    "truncated": (_truncate, "DecodeError: Error parsing message"),
    "corrupt": (_garble, "DecodeError: Error parsing message"),
    "missing_key": (_edit(_drop_state), "missing feature keys \\['steps/observation/state'\\]"),
    "wrong_image_shape": (_edit(_wrong_image_shape), "step 3 observation/image is 30x20, the feature spec says 16x20"),
    "nan_action": (_edit(_nan_action), "non-finite action at step 1, dimension 1"),
}


def _corrupt_copy(clean_dir: str, dst: str, edit) -> str:
    """Copies the dataset and rewrites record BAD_INDEX of its only shard with `edit`."""
    shutil.copytree(clean_dir, dst)
    source = EpisodeSource(dst, "bridge")
    assert len(source.filenames) == 1
    path = source.filenames[0]
    records = [grain.sources.ArrayRecordDataSource([path])[i] for i in range(len(source))]
    records[BAD_INDEX] = edit(records[BAD_INDEX])
    os.remove(path)
    writer = ArrayRecordWriter(path, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return path


def _config(data_dir, **overrides):
    config = config_lib.get_data_config()
    config.update(data_dir=data_dir, datasets="bridge", resolution=(8, 8), num_frames=5, batch_size=4)
    config.update(overrides)
    return config


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_named_or_skipped(clean, tmp_path, case):
    clean_dir, stats = clean
    edit, reason = CASES[case]
    path = _corrupt_copy(clean_dir, str(tmp_path / "oxe"), edit)
    source = EpisodeSource(str(tmp_path / "oxe"), "bridge")
    assert len(source[BAD_INDEX - 1]) > 0  # neighbours still read
    with pytest.raises(BadRecordError, match=reason) as info:
        source[BAD_INDEX]
    message = str(info.value)
    assert "'bridge'" in message and path in message and f"record {BAD_INDEX}" in message
    assert (info.value.filename, info.value.record_index) == (path, BAD_INDEX)

    # 4 episodes x 4 clip slots: three batches of 4 must reach the bad episode.
    with pytest.raises(BadRecordError, match=f"record {BAD_INDEX}"):
        iterator = pipeline.make_iterator(_config(str(tmp_path / "oxe")), stats=stats)
        for _ in range(4):
            next(iterator)

    before = rlds_source.bad_record_counts().get("bridge", 0)
    iterator = pipeline.make_iterator(_config(str(tmp_path / "oxe"), skip_bad_records=True), stats=stats)
    batches = [next(iterator) for _ in range(6)]
    assert all(b["frames"].shape == (4, 5, 8, 8, 3) for b in batches)
    assert rlds_source.bad_record_counts()["bridge"] > before


def test_stats_skip_bad_records(clean, tmp_path):
    _corrupt_copy(clean[0], str(tmp_path / "oxe"), _edit(_nan_action))
    with pytest.raises(BadRecordError, match="non-finite action"):
        stats_lib.compute_stats(str(tmp_path / "oxe"), ["bridge"])
    stats = stats_lib.compute_stats(str(tmp_path / "oxe"), ["bridge"], skip_bad_records=True)
    assert stats["datasets"]["bridge"]["num_episodes"] == 3


def test_unknown_dataset_in_config(clean):
    config = _config(clean[0], datasets="bridge,no_such_robot")
    with pytest.raises(KeyError, match="no_such_robot.*known datasets: .*fractal20220817_data"):
        pipeline.make_dataset(config, stats={"datasets": {}, "proprio_dim": 8})


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="Dataset 'droid': no TFDS dataset"):
        EpisodeSource(str(tmp_path), "droid")


def test_inspect_cli_reports_and_fails_on_bad_record(clean, tmp_path):
    run = lambda d: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "data_pipelines.inspect", f"--data_dir={d}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    good = run(clean[0])
    assert good.returncode == 0, good.stderr[-2000:]
    assert "bridge: 4 episodes" in good.stdout and "unique instructions" in good.stdout
    path = _corrupt_copy(clean[0], str(tmp_path / "oxe"), _edit(_wrong_image_shape))
    bad = run(str(tmp_path / "oxe"))
    assert bad.returncode == 1
    assert f"dataset 'bridge', file {path}, record {BAD_INDEX}" in bad.stderr
