"""Writes procedural captioned videos (mp4/webm/mkv via PyAV) plus captions.jsonl, as a stand-in video corpus.

  python -m data_pipelines.make_videos --out=DIR --num_videos=8

Each video shows shapes moving along a captioned direction, so a video model has something to learn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

MOTIONS = {
    "a red ball rolls to the right": ((1.0, 0.0), (220, 40, 40)),
    "a green cube slides to the left": ((-1.0, 0.0), (40, 200, 60)),
    "a blue block falls down": ((0.0, 1.0), (50, 80, 230)),
    "a yellow disk rises up": ((0.0, -1.0), (230, 210, 40)),
}


def render_video(caption: str, num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 frames [num_frames, height, width, 3] of the motion named by `caption`."""
    (dx, dy), color = MOTIONS[caption]
    rng = np.random.default_rng(seed)
    size = max(4, min(height, width) // 6)
    x, y = rng.uniform(size, width - 2 * size), rng.uniform(size, height - 2 * size)
    speed = rng.uniform(0.5, 1.5) * min(height, width) / num_frames
    background = rng.integers(0, 70, size=3)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i] = background
        cx = int(np.clip(x + dx * speed * i, 0, width - size))
        cy = int(np.clip(y + dy * speed * i, 0, height - size))
        frames[i, cy : cy + size, cx : cx + size] = color
    return frames


def write_video(path: str, frames: np.ndarray, fps: int) -> None:
    """Encodes frames with PyAV; the codec follows the file extension (mp4: h264, webm: vp9, mkv: mpeg4)."""
    import av

    codec = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "mpeg4"}[os.path.splitext(path)[1]]
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_videos(
    out_dir: str, num_videos: int = 8, *, num_frames: int = 48, size: tuple[int, int] = (64, 96), fps: int = 16,
    extensions: Sequence[str] = (".mp4", ".mkv"), seed: int = 0,
) -> str:
    """Writes `num_videos` videos and `captions.jsonl` under out_dir; returns the captions path."""
    os.makedirs(out_dir, exist_ok=True)
    captions = list(MOTIONS)
    lines = []
    for i in range(num_videos):
        caption = captions[i % len(captions)]
        name = f"clip_{i:04d}{extensions[i % len(extensions)]}"
        write_video(os.path.join(out_dir, name), render_video(caption, num_frames, *size, seed=seed + i), fps)
        lines.append(json.dumps({"video": name, "caption": caption}))
    captions_path = os.path.join(out_dir, "captions.jsonl")
    with open(captions_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return captions_path


def main(argv: Sequence[str]) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    path = make_videos(f.out, f.num_videos, num_frames=f.num_frames, seed=f.seed)
    print(f"Wrote {f.num_videos} videos and {path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Directory for the videos and captions.jsonl.", required=True)
    flags.DEFINE_integer("num_videos", 8, "How many videos.")
    flags.DEFINE_integer("num_frames", 48, "Frames per video.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    app.run(main)
