"""The `config.data` block of the OXE pipeline."""

from __future__ import annotations

import ml_collections


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
    config.clips_per_episode = 4  # clip windows drawn per episode per epoch, spread over the episode
    config.resolution = (32, 32)  # (H, W)
    config.proprio_dim = 8
    config.action_normalization = "bounds"  # "bounds": q01/q99 -> [-1, 1], clipped; "normal": mean/std
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
