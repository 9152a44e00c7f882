"""Episode -> clip windows of 1 + 4k frames with the aligned, normalized action chunk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipelines.config import check_num_frames, num_clip_actions, state_frames  # noqa: F401  (re-exported)
from data_pipelines.sources.rlds import Episode
from data_pipelines.standardize import embodiments
from data_pipelines.standardize import stats as stats_lib


def clip_start(length: int, num_frames: int, frame_stride: int, slot: int, clips_per_episode: int, u: float) -> int:
    """First step of clip `slot` of an episode of `length` steps; `u` in [0, 1) jitters it in its stratum.

    Slots split the valid starts into `clips_per_episode` equal strata so an epoch covers each episode
    evenly; episodes shorter than one clip start at 0 and are padded.
    """
    span = (num_frames - 1) * frame_stride + 1
    num_starts = max(length - span, 0) + 1
    return min(int((slot + u) * num_starts / clips_per_episode), num_starts - 1)


def is_idle(
    episode: Episode, start: int, steps: int, threshold: float, embodiment: embodiments.Embodiment = embodiments.EEF7
) -> bool:
    """Whether the robot stands still over the window's `steps` transitions from `start`: every movement of every
    action below `threshold` in absolute value (a delta dimension's value, an absolute target's change from the
    step before) and every gripper command unchanged."""
    window = np.asarray(episode.actions[start : start + max(steps, 1)], np.float32)
    if not len(window):
        return False
    grippers = np.zeros(window.shape[-1], bool)
    grippers[list(embodiment.gripper_dims)] = True
    absolute = np.zeros(window.shape[-1], bool)
    absolute[list(embodiment.absolute_dims)] = True
    moves = np.where(absolute, window - np.concatenate([window[:1], window[:-1]]), window)
    still = np.all(np.abs(moves[:, ~grippers]) < threshold)
    return bool(still and np.all(window[:, grippers] == window[0, grippers]))


def per_step_actions(episode: Episode, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` consecutive dataset-step actions from `start` and their mask (False past the episode's last
    transition: action j takes step start + j to start + j + 1, which has to exist)."""
    index = start + np.arange(count)
    mask = index + 1 < len(episode)
    chunk = np.zeros((count, episode.actions.shape[-1]), np.float32)
    chunk[mask] = episode.actions[index[mask]]
    return chunk, mask


def make_clip(
    episode: Episode,
    start: int,
    *,
    num_frames: int,
    frame_stride: int,
    resolution: tuple[int, int],
    dataset_stats: dict[str, Any],
    proprio_dim: int,
    action_normalization: str,
    dataset_index: int,
    wrist_camera: bool,
    action_horizon: int = 0,
    frame_decoder: Callable[[int], np.ndarray] | None = None,
    proprio_chunk_frames: int = 0,
    action_dim: int = 7,
    embodiment: embodiments.Embodiment = embodiments.EEF7,
) -> dict[str, np.ndarray]:
    """Builds one example of the batch contract from `episode`, starting at step `start`.

    Actions: one per frame transition (averaged over the stride), or with `action_horizon` > 0 every dataset
    step's action, (num_frames - 1) * frame_stride of them (`num_clip_actions`). `frame_decoder(step)` gives the
    frame of a step when it is not the primary camera alone (several views). Proprio: the state at the first
    frame [proprio_dim], or with `proprio_chunk_frames` > 0 one state per chunk [C, proprio_dim] (`state_frames`).
    Actions are in the dataset's `embodiment` layout (made relative to their chunk's start state where it says so),
    normalized, then zero-padded to `action_dim`; `action_dim_mask` marks the embodiment's own dimensions.
    """
    length = len(episode)
    steps = start + frame_stride * np.arange(num_frames)
    frame_mask = steps < length
    last_valid = int(steps[frame_mask][-1])
    frame_steps = np.minimum(steps, last_valid)
    decode = frame_decoder or (lambda step: episode.decode_frame(step, resolution))
    frames = np.stack([decode(int(s)) for s in frame_steps])

    own = episode.actions.shape[-1]
    if action_horizon > 0:
        count = num_clip_actions(num_frames, frame_stride, action_horizon)
        chunk, action_mask = per_step_actions(episode, start, count)
        action_frames = np.arange(count) // frame_stride
    else:
        # actions[i] takes frame i to frame i + 1: the mean per-step delta over the stride (so it matches
        # the per-step statistics), and the stride's last value for grippers and absolute targets.
        last = embodiment.last_of_stride()
        chunk = np.zeros((num_frames - 1, own), np.float32)
        action_mask = frame_mask[1:].copy()
        for i in np.flatnonzero(action_mask):
            window = episode.actions[steps[i] : steps[i] + frame_stride]
            chunk[i] = np.where(last, window[-1], window.mean(0))
        action_frames = np.arange(num_frames - 1)
    if embodiment.relative_to_state:
        # Each action relative to the state its chunk starts from (frame 0, or its chunk's state frame).
        group = proprio_chunk_frames or num_frames
        reference = frame_steps[(action_frames // group) * group]
        for j in np.flatnonzero(action_mask):
            chunk[j] = embodiment.to_relative(chunk[j], episode.proprio[int(reference[j])])
    chunk = stats_lib.normalize(chunk, dataset_stats["action"], action_normalization)
    chunk[~action_mask] = 0.0
    chunk = embodiments.pad_actions(chunk, action_dim, episode.dataset)

    state_steps = frame_steps[state_frames(num_frames, proprio_chunk_frames)]
    raw = np.stack([np.asarray(episode.proprio[int(s)], np.float32) for s in state_steps])
    if raw.shape[-1] > proprio_dim:
        raise ValueError(
            f"{episode.dataset}: proprio has {raw.shape[-1]} dims, more than data.proprio_dim={proprio_dim}"
        )
    proprio = np.zeros((len(state_steps), proprio_dim), np.float32)
    proprio[:, : raw.shape[-1]] = raw
    proprio = stats_lib.normalize(proprio, dataset_stats["proprio"], "normal").astype(np.float32)
    if proprio_chunk_frames == 0:
        proprio = proprio[0]

    example = {
        "frames": frames,
        "frame_mask": frame_mask,
        "actions": chunk,
        "action_mask": action_mask,
        "action_dim_mask": embodiments.dim_mask(own, action_dim),
        "has_actions": np.bool_(True),
        "proprio": proprio,
        "instruction": np.str_(episode.instruction),
        "dataset_index": np.int32(dataset_index),
    }
    if wrist_camera:
        if not episode.has_wrist:
            raise ValueError(f"data.wrist_camera=True but dataset {episode.dataset!r} has no wrist camera in its spec")
        example["wrist_frames"] = np.stack([episode.decode_frame(int(s), resolution, wrist=True) for s in frame_steps])
    return example
