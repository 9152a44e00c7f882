"""Planning a video ingest: which files, which captions, which shard.

captions.jsonl holds one {"video": "<relative path or file name>", "caption": "..."} per line; the
path is matched relative to the video root (default: the captions file's directory), then by file name.
Files are assigned to shards by their sorted relative path, so the same inputs give the same shards.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class VideoFile:
    """One input video: where it is, its name in shards and report, its caption."""

    path: str
    source: str
    caption: str



def load_captions(captions_path: str) -> dict[str, str]:
    """Reads captions.jsonl into {normalized video path: caption}; errors name the file and line."""
    captions: dict[str, str] = {}
    with open(captions_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{captions_path}:{line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
                raise ValueError(f'{where}: expected {{"video": "<path>", "caption": "..."}}, got {line.strip()}')
            caption = entry.get("caption")
            if not isinstance(caption, str):
                raise ValueError(f"{where}: caption of {entry['video']!r} is {caption!r}, expected a string")
            captions[os.path.normpath(entry["video"])] = caption
    return captions


def _expand_videos(videos: str | Sequence[str]) -> list[str]:
    patterns = [p for p in videos.split(",") if p] if isinstance(videos, str) else list(videos)
    paths: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(pattern):
            paths.add(pattern)
        else:
            raise FileNotFoundError(f"video file {pattern!r} does not exist")
    return list(paths)


def _source_name(path: str, video_root: str) -> str:
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(video_root))
    return os.path.normpath(path) if relative.startswith("..") else relative


def plan_videos(
    videos: str | Sequence[str], captions_path: str, video_root: str | None = None
) -> tuple[list[VideoFile], list[dict[str, str]]]:
    """Captioned videos sorted by source name, and the report entries of videos without a caption."""
    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(captions_path))
    captions = load_captions(captions_path)
    by_basename: dict[str, list[str]] = {}
    for key, caption in captions.items():
        by_basename.setdefault(os.path.basename(key), []).append(caption)
    planned, skipped = [], []
    for path in _expand_videos(videos):
        source = _source_name(path, root)
        caption = captions.get(source)
        if caption is None and len(by_basename.get(os.path.basename(source), [])) == 1:
            caption = by_basename[os.path.basename(source)][0]
        if caption is None:
            skipped.append({"path": source, "reason": f"no caption in {os.path.basename(captions_path)}"})
        else:
            planned.append(VideoFile(path=path, source=source, caption=caption))
    planned.sort(key=lambda v: v.source)
    names = [v.source for v in planned]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"videos {duplicates} appear twice under different paths; give one glob per file")
    skipped.sort(key=lambda entry: entry["path"])
    return planned, skipped


def assign_shards(files: Sequence[VideoFile], num_shards: int) -> list[list[VideoFile]]:
    """Round-robin over the sorted files: deterministic and balanced in file count."""
    return [list(files[i::num_shards]) for i in range(num_shards)]
