"""The `config.data` block of the OXE pipeline."""

from __future__ import annotations

import ml_collections
import numpy as np


def get_data_config() -> ml_collections.ConfigDict:
    """Returns the data config with tiny defaults (32x32 clips of 9 frames, in-process decoding)."""
    config = ml_collections.ConfigDict()
    config.data_dir = ""  # holds one TFDS dataset per OXE name: <data_dir>/<name>/<version>/
    config.datasets = "fractal20220817_data,bridge,taco_play,droid"  # comma-separated names or a list
    config.weights = ()  # one per dataset; empty: equal weights
    config.balance_weights = False  # multiply weights by each dataset's number of transitions
    config.split = "train"
    config.num_frames = 9  # T = 1 + 4k, the Wan VAE's causal 4x time compression
    config.frame_stride = 1  # dataset steps between consecutive clip frames
    # Actions per chunk with every dataset step's action kept ((num_frames - 1) * frame_stride per clip);
    # 0: one action per frame transition, averaged over the stride.
    config.action_horizon = 0
    config.clips_per_episode = 4  # clip windows drawn per episode per epoch, spread over the episode
    config.resolution = (32, 32)  # (H, W)
    config.proprio_dim = 8
    # Width of every clip's action vector: each dataset's embodiment (its own action layout) is zero-padded to it
    # and `action_dim_mask` marks its dimensions. The run config ties it to model.action_dim.
    config.action_dim = 7
    # Clip frames per chunk of a chunk-causal model (4 * model.chunk_latent_frames) for one state per chunk:
    # `proprio` is then [1 + (num_frames - 1) / proprio_chunk_frames, proprio_dim], chunk 0's the state at frame 0
    # and chunk k's the state at the last frame of chunk k - 1. 0: one state per clip, [proprio_dim], at frame 0.
    config.proprio_chunk_frames = 0
    # "bounds" (alias "quantile", openpi's pi0.5 choice): q01/q99 -> [-1, 1], clipped; "normal": mean/std.
    config.action_normalization = "bounds"
    # Drop clip windows where the robot stands still: "NAME=THRESHOLD,..." per dataset or "*=THRESHOLD" for all; a
    # window is idle when every movement dimension of every raw action is below the threshold and the gripper
    # command does not change. "" keeps every window.
    config.idle_filter = ""
    config.batch_size = 8  # GLOBAL batch; each process gets batch_size / process_count
    config.seed = 0
    config.shuffle = True
    config.worker_count = 0  # Grain worker processes decoding episodes; 0 decodes in-process
    config.worker_buffer_size = 2  # batches each worker prepares ahead
    # Threads reading clips ahead, and how many clips they may hold: Grain's default (500) would keep
    # 4 GB of 480x640 clips per process in memory.
    config.read_threads = 2
    config.prefetch_buffer_size = 16
    config.stats_path = ""  # JSON from `python -m data_pipelines.compute_stats`; empty: compute at start-up
    config.skip_bad_records = False  # skip, count and log unreadable shards and records instead of failing
    config.wrist_camera = False
    # Share of each dataset's episodes held out for offline evaluation (a hash of the episode index; the
    # training stream never reads them). 0 = none held out.
    config.eval_fraction = 0.0
    # Cameras of each clip (keys or the roles primary/wrist, comma-separated; "" = the primary alone) and how
    # several reach the model: "tile" (one frame of `resolution`, views in a grid) or "tokens" (a views axis).
    config.cameras = ""
    config.view_layout = "tile"
    return config


def dataset_names(config: ml_collections.ConfigDict) -> list[str]:
    """The config's dataset names as a list (it accepts a comma-separated string or a sequence)."""
    names = config.datasets
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError("config.data.datasets is empty; name at least one dataset")
    return list(names)


def check_num_frames(num_frames: int) -> None:
    """Raises unless `num_frames` is 1 + 4k (the Wan VAE compresses time 4x causally)."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"data.num_frames must be 1 + 4k (1, 5, 9, 13, ...), got {num_frames}")


def num_clip_actions(num_frames: int, frame_stride: int = 1, action_horizon: int = 0) -> int:
    """Actions per clip: one per frame transition, or every dataset step's when `action_horizon` > 0.

    With `action_horizon` > 0 a chunk's frames (`action_horizon / frame_stride` of them) must be a whole
    number of 4-frame VAE latents, and the clip's `num_frames - 1` a whole number of chunks.
    """
    check_num_frames(num_frames)
    if frame_stride < 1:
        raise ValueError(f"data.frame_stride must be >= 1, got {frame_stride}")
    if action_horizon < 0:
        raise ValueError(f"data.action_horizon must be >= 0, got {action_horizon}")
    if action_horizon == 0:
        return num_frames - 1
    chunk_frames, rest = divmod(action_horizon, frame_stride)
    if rest or chunk_frames % 4 or (num_frames - 1) % max(chunk_frames, 1) or chunk_frames == 0:
        raise ValueError(
            f"data.action_horizon={action_horizon} with data.frame_stride={frame_stride} and "
            f"data.num_frames={num_frames}: a chunk's actions must span a whole number of 4-frame VAE latents "
            f"(action_horizon / frame_stride = 4k frames) and num_frames - 1 a whole number of chunks; "
            f"e.g. action_horizon=24, frame_stride=3, num_frames=33 (4 chunks of 8 frames)"
        )
    return (num_frames - 1) * frame_stride


def state_frames(num_frames: int, proprio_chunk_frames: int = 0) -> np.ndarray:
    """Clip frame of each chunk's state: [0] for one state per clip; with `proprio_chunk_frames` > 0 chunk 0's is
    frame 0 and chunk k's is the last frame of chunk k - 1 ((k - 1) * proprio_chunk_frames), the observation
    the robot has when chunk k's actions start."""
    check_num_frames(num_frames)
    if proprio_chunk_frames == 0:
        return np.zeros(1, np.int64)
    if proprio_chunk_frames < 0 or proprio_chunk_frames % 4 or (num_frames - 1) % proprio_chunk_frames:
        raise ValueError(
            f"data.proprio_chunk_frames={proprio_chunk_frames} with data.num_frames={num_frames}: a chunk is a "
            f"whole number of 4-frame VAE latents (4 * model.chunk_latent_frames) and num_frames - 1 a whole "
            f"number of chunks; 0 keeps one state per clip"
        )
    num_chunks = 1 + (num_frames - 1) // proprio_chunk_frames
    return np.maximum(np.arange(num_chunks) - 1, 0) * proprio_chunk_frames


def clip_num_states(data: ml_collections.ConfigDict) -> int | None:
    """States per clip of a data config: None for one state per clip (proprio [proprio_dim]), else one per chunk
    (proprio [C, proprio_dim], `state_frames`)."""
    chunk_frames = int(data.get("proprio_chunk_frames", 0))
    return None if chunk_frames == 0 else len(state_frames(int(data.num_frames), chunk_frames))
