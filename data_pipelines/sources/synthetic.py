"""Synthetic clips in the batch contract: a square moved by its actions, for runs with no dataset at hand.

Everything it produces is labelled synthetic (instructions read "synthetic: ..."); it is for smoke tests and
the CPU quickstart's first minutes, never a substitute for the OXE pipeline.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from data_pipelines.clips.process_split import split_for_process
from data_pipelines.config import num_clip_actions, state_frames

INSTRUCTIONS = ("synthetic: move the block right", "synthetic: move the block left", "synthetic: lift the block")


class SyntheticClip:
    """Clip `index` of the synthetic source: deterministic in (seed, index)."""

    def __init__(
        self, num_frames: int, resolution: tuple[int, int], proprio_dim: int, seed: int, num_actions: int | None = None,
        proprio_chunk_frames: int = 0,
    ):
        self.num_frames = num_frames
        self.proprio_chunk_frames = proprio_chunk_frames  # > 0: one state per chunk (data.proprio_chunk_frames)
        # Per-step actions (data.action_horizon > 0): each frame transition's action repeated over its steps.
        self.steps_per_frame = 1 if num_actions is None else num_actions // (num_frames - 1)
        self.height, self.width = resolution
        self.proprio_dim = proprio_dim
        self.seed = seed

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        t, h, w = self.num_frames, self.height, self.width
        task = int(rng.integers(len(INSTRUCTIONS)))
        direction = {0: (0.0, 1.0), 1: (0.0, -1.0), 2: (-1.0, 0.0)}[task]
        speed = rng.uniform(0.5, 1.5)
        actions = np.zeros((t - 1, 7), np.float32)
        actions[:, 0] = direction[0] * speed + 0.1 * rng.standard_normal(t - 1)
        actions[:, 1] = direction[1] * speed + 0.1 * rng.standard_normal(t - 1)
        actions[:, 6] = 1.0 if task == 2 else -1.0
        size = max(2, min(h, w) // 6)
        pos = np.array([rng.uniform(size, h - 2 * size), rng.uniform(size, w - 2 * size)])
        color = rng.integers(80, 255, size=3)
        background = rng.integers(0, 60, size=3)
        frames = np.empty((t, h, w, 3), np.uint8)
        positions = np.empty((t, 2))
        for i in range(t):
            positions[i] = pos
            frame = np.empty((h, w, 3), np.uint8)
            frame[:] = background
            y, x = np.clip(pos, 0, [h - size, w - size]).astype(int)
            frame[y : y + size, x : x + size] = color
            frames[i] = frame
            if i < t - 1:
                pos = pos + actions[i, :2]
        # The block's position at each state's frame (never a later one) and the gripper command.
        state_at = state_frames(t, self.proprio_chunk_frames)
        proprio = np.zeros((len(state_at), self.proprio_dim), np.float32)
        proprio[:, :2] = positions[state_at] / np.array([h, w]) * 2 - 1
        proprio[:, min(6, self.proprio_dim - 1)] = actions[0, 6]
        if self.proprio_chunk_frames == 0:
            proprio = proprio[0]
        actions = np.repeat(np.clip(actions / 2.0, -1, 1).astype(np.float32), self.steps_per_frame, axis=0)
        return {
            "frames": frames,
            "frame_mask": np.ones(t, bool),
            "actions": actions,
            "action_mask": np.ones(len(actions), bool),
            "action_dim_mask": np.ones(actions.shape[-1], bool),
            "has_actions": np.bool_(True),
            "proprio": proprio,
            "instruction": np.str_(INSTRUCTIONS[task]),
            "dataset_index": np.int32(0),
        }


def make_synthetic_dataset(
    data_config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """Per-process batches of synthetic clips (global batch_size / process_count each), endlessly repeated."""
    if data_config.batch_size % process_count:
        raise ValueError(f"data.batch_size={data_config.batch_size} is not divisible by {process_count} processes")
    num_actions = num_clip_actions(
        data_config.num_frames, data_config.frame_stride, data_config.get("action_horizon", 0)
    )
    clip = SyntheticClip(
        data_config.num_frames, tuple(data_config.resolution), data_config.proprio_dim, data_config.seed, num_actions,
        int(data_config.get("proprio_chunk_frames", 0)),
    )
    dataset = grain.MapDataset.range(data_config.synthetic_examples)
    if data_config.shuffle:
        dataset = dataset.shuffle(seed=data_config.seed)
    per_process = data_config.batch_size // process_count
    dataset = split_for_process(dataset.repeat().map(clip), process_index, process_count, per_process)
    return dataset.to_iter_dataset().batch(data_config.batch_size // process_count, drop_remainder=True)
