"""Captioned-video ingest -> ArrayRecord shards -> Grain examples, on tiny videos made with PyAV."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import av
import grain
import numpy as np
import pytest
from absl import flags

from data_pipelines.sources import video as video_source
from data_pipelines.sources.shards import BadShardError
from wamjax.jobs import ingest_plan, ingest_video

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 32, 48


def gray_level(frame_index: int) -> int:
    """Procedural frame content: a flat gray whose level encodes the frame index."""
    return 10 + 6 * frame_index


def frame_index_of(level: float) -> int:
    return round((level - 10) / 6)


def make_video(path: str, num_frames: int, fps: int, codec: str = "libx264",
               size: tuple[int, int] = (HEIGHT, WIDTH), level_of=gray_level) -> str:
    """Writes a video whose frame i is a flat gray of `level_of(i)` (mod 256), with a white top-left dot."""
    height, width = size
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000  # Near-lossless: frame order is read back from gray levels.
        for i in range(num_frames):
            image = np.full((height, width, 3), level_of(i) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_captions(path: str, captions: dict[str, str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for video, caption in captions.items():
            f.write(json.dumps({"video": video, "caption": caption}) + "\n")
    return path


def shard_bytes(directory: str) -> dict[str, bytes]:
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in sorted(os.listdir(directory))
        if name.endswith(video_source.SHARD_SUFFIX)
    }


@pytest.fixture(scope="module")
def good_videos(tmp_path_factory):
    """Three containers/codecs/frame rates; all 2-3 s long so clips at 10 fps are easy to predict."""
    root = tmp_path_factory.mktemp("videos")
    make_video(str(root / "a_h264.mp4"), num_frames=40, fps=20, codec="libx264")
    make_video(str(root / "b_vp8.webm"), num_frames=24, fps=12, codec="libvpx")
    os.makedirs(root / "sub")
    make_video(str(root / "sub" / "c_mpeg4.mkv"), num_frames=30, fps=10, codec="mpeg4", size=(48, 32))
    captions = write_captions(str(root / "captions.jsonl"), {
        "a_h264.mp4": "a gray fade",
        "b_vp8.webm": "a webm fade",
        "sub/c_mpeg4.mkv": "a tall fade",
    })
    return root, captions


def test_ingest_to_examples_shapes_order_and_timing(good_videos, tmp_path):
    root, captions = good_videos
    report = ingest_video.ingest(
        f"{root}/**/*.mp4,{root}/**/*.webm,{root}/**/*.mkv", captions, str(tmp_path / "shards"),
        num_frames=5, fps=10, resolution=(16, 24), resize_mode="crop", num_shards=2, workers=1,
        show_progress=False,
    )
    # 10 fps samples: a 40 frames @20 fps = 2 s, b 24 @12 fps = 2 s, c 30 @10 fps = 3 s; 5-frame clips.
    assert report["skipped"] == []
    assert report["videos_used"] == 3
    assert report["clips"] == 4 + 4 + 6
    on_disk = json.load(open(tmp_path / "shards" / ingest_video.REPORT_NAME))
    assert on_disk["clips"] == report["clips"]

    dataset = video_source.make_video_dataset(
        str(tmp_path / "shards"), num_frames=5, resolution=(16, 24), seed=0, shuffle=False,
        include_metadata=True,
    )
    assert len(dataset) == 14
    source_fps = {"a_h264.mp4": 20, "b_vp8.webm": 12, "sub/c_mpeg4.mkv": 10}
    captions_by_source = {"a_h264.mp4": "a gray fade", "b_vp8.webm": "a webm fade",
                          "sub/c_mpeg4.mkv": "a tall fade"}
    starts: dict[str, list[float]] = {}
    for example in dataset:
        source = str(example["clip_source"])
        assert example["frames"].shape == (5, 16, 24, 3) and example["frames"].dtype == np.uint8
        assert str(example["instruction"]) == captions_by_source[source]
        assert float(example["clip_fps"]) == 10.0
        # Sample j of clip k is at (5k + j) / 10 s and shows the source frame on screen then; the
        # gray level says which frame that was, the stored time says when it was shown.
        k = round(float(example["clip_start_time"]) / 0.5)
        expected = [int(np.floor((5 * k + j) / 10 * source_fps[source] + 1e-6)) for j in range(5)]
        decoded = [frame_index_of(level) for level in example["frames"][:, 8, 12].mean(axis=-1)]
        assert decoded == expected, (source, decoded, expected)
        np.testing.assert_allclose(example["clip_frame_times"], np.array(expected) / source_fps[source],
                                   atol=2e-3)
        starts.setdefault(source, []).append(round(float(example["clip_start_time"]), 3))
    assert {k: sorted(v) for k, v in starts.items()} == {
        "a_h264.mp4": [0.0, 0.5, 1.0, 1.5],
        "b_vp8.webm": [0.0, 0.5, 1.0, 1.5],
        "sub/c_mpeg4.mkv": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5],
    }

    # The contract, as a batch: what the trainer and the mixture consume.
    contract = video_source.make_video_dataset(
        str(tmp_path / "shards"), num_frames=5, resolution=(16, 24), seed=3, dataset_index=2
    )
    batch = next(iter(contract.batch(4)))
    assert set(batch) == {"frames", "frame_mask", "actions", "action_mask", "action_dim_mask", "has_actions",
                          "proprio", "instruction", "dataset_index"}
    assert batch["action_dim_mask"].shape == (4, 7) and batch["action_dim_mask"].all()
    assert batch["has_actions"].dtype == bool and not batch["has_actions"].any()
    assert batch["frames"].shape == (4, 5, 16, 24, 3) and batch["frames"].dtype == np.uint8
    assert batch["frame_mask"].dtype == bool and batch["frame_mask"].all()
    assert batch["actions"].shape == (4, 4, 7) and batch["actions"].dtype == np.float32
    assert not batch["actions"].any()
    assert batch["action_mask"].shape == (4, 4) and not batch["action_mask"].any()
    assert batch["proprio"].shape == (4, 8) and batch["proprio"].dtype == np.float32
    assert batch["instruction"].dtype.kind == "U" and batch["instruction"].shape == (4,)
    assert set(batch["instruction"]) <= set(captions_by_source.values())
    assert batch["dataset_index"].dtype == np.int32 and (batch["dataset_index"] == 2).all()
    # Shuffling is a permutation that depends on the seed.
    order = [str(e["instruction"]) + str(e["frames"][0, 8, 12, 0] // 6) for e in contract]
    other = [str(e["instruction"]) + str(e["frames"][0, 8, 12, 0] // 6)
             for e in video_source.make_video_dataset(str(tmp_path / "shards"), num_frames=5,
                                                      resolution=(16, 24), seed=4)]
    assert sorted(order) == sorted(other) and order != other

    # More frames than stored: the last frame repeats and is masked out, like past an episode's end.
    longer = video_source.make_video_dataset(str(tmp_path / "shards"), num_frames=9, resolution=(8, 8),
                                             seed=0, shuffle=False)[0]
    assert longer["frames"].shape == (9, 8, 8, 3)
    assert longer["frame_mask"].tolist() == [True] * 5 + [False] * 4
    assert (longer["frames"][5:] == longer["frames"][4]).all()
    assert longer["actions"].shape == (8, 7)


def test_pad_mode_and_overlapping_clips(good_videos, tmp_path):
    root, captions = good_videos
    report = ingest_video.ingest(
        [str(root / "a_h264.mp4")], captions, str(tmp_path / "pad"), num_frames=5, fps=10,
        resolution=(24, 24), resize_mode="pad", clip_stride_s=0.2, num_shards=1, show_progress=False,
        image_format="png",
    )
    # 20 samples, a 5-sample clip every 2 samples: starts 0, 2, ..., 14.
    assert report["clips"] == 8
    source = video_source.VideoClipSource(str(tmp_path / "pad"))
    starts = [round(source[i]["start_time"], 3) for i in range(len(source))]
    assert starts == [round(0.2 * k, 3) for k in range(8)]
    assert source[0]["image_format"] == "png"
    example = video_source.make_video_dataset(str(tmp_path / "pad"), num_frames=5, resolution=(24, 24),
                                              seed=0, shuffle=False)[1]
    # 32x48 fits 24x24 as 16x24: four black rows above and below, the gray picture between.
    frames = example["frames"].astype(int)
    assert frames[:, :3].max() <= 3 and frames[:, -3:].max() <= 3
    assert [frame_index_of(v) for v in frames[:, 12, 12].mean(-1)] == [4, 6, 8, 10, 12]


def test_bad_files_are_reported_by_name_and_skipped(good_videos, tmp_path):
    root, _ = good_videos
    videos = tmp_path / "mixed"
    videos.mkdir()
    make_video(str(videos / "good.mp4"), num_frames=40, fps=20)
    make_video(str(videos / "short.mp4"), num_frames=3, fps=20)
    make_video(str(videos / "uncaptioned.mp4"), num_frames=40, fps=20)
    (videos / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (videos / "empty.mp4").write_bytes(b"")
    whole = make_video(str(tmp_path / "whole.mkv"), num_frames=40, fps=20)
    data = open(whole, "rb").read()
    (videos / "truncated.mkv").write_bytes(data[: len(data) * 2 // 3])
    captions = write_captions(str(videos / "captions.jsonl"), {
        name: f"caption of {name}"
        for name in ["good.mp4", "short.mp4", "corrupt.mp4", "empty.mp4", "truncated.mkv"]
    })
    report = ingest_video.ingest(
        f"{videos}/*.mp4,{videos}/*.mkv", captions, str(tmp_path / "out"), num_frames=5, fps=10,
        resolution=(16, 16), num_shards=3, workers=1, show_progress=False,
    )
    reasons = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == {"short.mp4", "uncaptioned.mp4", "corrupt.mp4", "empty.mp4", "truncated.mkv"}
    assert reasons["corrupt.mp4"].startswith("cannot decode")
    assert reasons["empty.mp4"].startswith("empty file")
    assert reasons["short.mp4"].startswith("too short")
    assert reasons["uncaptioned.mp4"].startswith("no caption")
    assert reasons["truncated.mkv"].startswith("truncated")
    assert str(tmp_path) not in json.dumps(report)  # Names relative to the videos, not this machine.
    assert report["videos_found"] == 6 and report["videos_used"] == 1 and report["videos_skipped"] == 5
    assert report["clips"] == 4
    source = video_source.VideoClipSource(str(tmp_path / "out"))
    assert {source[i]["source"] for i in range(len(source))} == {"good.mp4"}
    assert json.load(open(tmp_path / "out" / ingest_video.REPORT_NAME))["skipped"] == report["skipped"]


def test_bad_captions_and_changed_options_are_refused(good_videos, tmp_path):
    root, captions = good_videos
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a_h264.mp4", "caption": "ok"}\n{"video": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        ingest_plan.load_captions(str(bad))
    out = str(tmp_path / "out")
    ingest_video.ingest(str(root / "b_vp8.webm"), captions, out, num_frames=5, fps=10,
                        resolution=(8, 8), num_shards=1, show_progress=False)
    with pytest.raises(ValueError, match=r"different \['options'\]"):
        ingest_video.ingest(str(root / "b_vp8.webm"), captions, out, num_frames=5, fps=5,
                            resolution=(8, 8), num_shards=1, show_progress=False)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        video_source.make_video_dataset(out, num_frames=6, resolution=(8, 8), seed=0)


def test_killed_ingest_resumes_to_identical_shards(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(str(videos / "a_short.mp4"), num_frames=20, fps=20)
    # Shard 1 holds this long video alone, so a kill right after shard 0 lands inside it.
    make_video(str(videos / "b_long.mp4"), num_frames=2500, fps=50, level_of=lambda i: 10 + (i % 40) * 6)
    make_video(str(videos / "c_short.mp4"), num_frames=20, fps=20)
    captions = write_captions(str(videos / "captions.jsonl"),
                              {"a_short.mp4": "a", "b_long.mp4": "b", "c_short.mp4": "c"})
    options = dict(num_frames=5, fps=0, resolution=(24, 24), num_shards=3)
    reference = ingest_video.ingest(f"{videos}/*.mp4", captions, str(tmp_path / "reference"), workers=1,
                                    show_progress=False, **options)
    assert reference["clips"] == 4 + 500 + 4

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "wamjax.jobs.ingest_video", f"--videos={videos}/*.mp4",
               f"--captions={captions}", f"--out={killed}", "--num_frames=5", "--fps=0",
               "--resolution=24,24", "--num_shards=3", "--workers=1"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_shard = killed / video_source.shard_name(0, 3)
    writing_second = killed / f".{video_source.shard_name(1, 3)}.tmp"
    deadline = time.monotonic() + 60
    while not writing_second.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert first_shard.exists(), stderr.decode()[-2000:]
    assert not (killed / video_source.shard_name(1, 3)).exists(), "ingest finished before it was killed"
    assert writing_second.exists()  # Killed while writing shard 1.

    # Readers refuse the unfinished set, and never see the half-written shard.
    with pytest.raises(FileNotFoundError, match=r"incomplete: shard indices \[1, 2\]"):
        video_source.VideoClipSource(str(killed))
    partial = video_source.VideoClipSource(str(killed), require_complete=False)
    assert partial.paths == [str(first_shard)] and len(partial) == 4

    first_shard_mtime = first_shard.stat().st_mtime_ns
    resumed = ingest_video.ingest(f"{videos}/*.mp4", captions, str(killed), workers=2,
                                  show_progress=False, **options)
    assert first_shard.stat().st_mtime_ns == first_shard_mtime  # Finished shards are not redone.
    assert not [name for name in os.listdir(killed) if name.endswith(".tmp")]
    assert resumed == reference
    reference_shards = shard_bytes(str(tmp_path / "reference"))
    assert len(reference_shards) == 3
    assert shard_bytes(str(killed)) == reference_shards

    # Frame order inside a long clip survives the round trip (native fps: consecutive frames).
    source = video_source.VideoClipSource(str(killed))
    clip = next(source[i] for i in range(len(source)) if source[i]["source"] == "b_long.mp4"
                and source[i]["clip_index"] == 7)
    np.testing.assert_allclose(clip["frame_times"], [(35 + k) / 50 for k in range(5)], atol=1e-6)
    levels = [video_source.decode_image(f)[12, 12].mean() for f in clip["frames"]]
    assert [frame_index_of(v) for v in levels] == [(35 + k) % 40 for k in range(5)]


def test_grain_loader_reads_shards_in_worker_processes(good_videos, tmp_path):
    """The source pickles into Grain's worker processes and its iterator checkpoints exactly."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain reads its absl flags; pytest never parses them.
    root, captions = good_videos
    ingest_video.ingest(str(root / "a_h264.mp4"), captions, str(tmp_path / "shards"), num_frames=5,
                        fps=10, resolution=(8, 8), num_shards=2, show_progress=False)
    dataset = video_source.make_video_dataset(str(tmp_path / "shards"), num_frames=5, resolution=(8, 8),
                                              seed=1, num_epochs=None)
    iterator = iter(dataset.to_iter_dataset().batch(2))
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["frames"] for _ in range(3)]
    iterator.set_state(state)
    assert all((next(iterator)["frames"] == e).all() for e in expected)

    options = grain.multiprocessing.MultiprocessingOptions(num_workers=1)
    loader_batch = next(iter(dataset.to_iter_dataset().batch(2).mp_prefetch(options)))
    assert loader_batch["frames"].shape == (2, 5, 8, 8, 3)


def test_truncated_shard_is_named_and_rewritten_on_rerun(good_videos, tmp_path):
    root, captions = good_videos
    out = str(tmp_path / "shards")
    run = lambda: ingest_video.ingest(  # noqa: E731
        f"{root}/*.mp4,{root}/*.webm", captions, out, num_frames=5, fps=10, resolution=(8, 8), num_shards=2,
        show_progress=False,
    )
    report = run()
    before = shard_bytes(out)
    path = os.path.join(out, video_source.shard_name(0, 2))
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(BadShardError, match="re-run wamjax.jobs.ingest_video") as info:
        video_source.VideoClipSource(out)
    assert path in str(info.value)
    assert run() == report  # The resumed run sees the truncated shard as unfinished and writes it again.
    assert shard_bytes(out) == before
    assert len(video_source.VideoClipSource(out)) == report["clips"]
