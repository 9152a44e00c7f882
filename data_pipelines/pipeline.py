"""The OXE training input: standardized RLDS episodes -> clips -> weighted mixture -> per-process batches."""

from __future__ import annotations

import threading
import zlib
from collections import Counter
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from data_pipelines import config as config_lib
from data_pipelines.clips import holdout, mixture, views, windowing
from data_pipelines.clips.process_split import split_for_process
from data_pipelines.sources import episodes as episode_sources
from data_pipelines.sources.rlds import BadRecordError, count_bad_record
from data_pipelines.standardize import stats as stats_lib


class ClipLoader:
    """Maps (position in the stream, clip slot) to one example of the batch contract.

    The slot picks the episode and the stratum of its clip start; the position seeds the jitter, so a
    later epoch draws different clips. Picklable for Grain workers.
    """

    def __init__(
        self,
        source: episode_sources.EpisodeReader,
        dataset_index: int,
        dataset_stats: dict[str, Any],
        config: ml_collections.ConfigDict,
    ):
        self.source = source
        self.dataset_index = dataset_index
        self.dataset_stats = dataset_stats
        self.clips_per_episode = int(config.clips_per_episode)
        self.num_frames = int(config.num_frames)
        self.frame_stride = int(config.frame_stride)
        self.action_horizon = int(config.get("action_horizon", 0))
        self.resolution = tuple(int(v) for v in config.resolution)
        self.proprio_dim = int(config.proprio_dim)
        self.proprio_chunk_frames = int(config.get("proprio_chunk_frames", 0))
        self.action_normalization = str(config.action_normalization)
        self.idle_threshold = idle_threshold(config, source.name)
        self.action_dim = int(config.get("action_dim", 7))
        self.wrist_camera = bool(config.wrist_camera)
        self.skip_bad_records = bool(config.skip_bad_records)
        self.seed = int(config.seed)
        self.cameras = views.dataset_cameras(source.name, views.camera_names(config), config.data_dir)
        self.view_layout = views.view_layout(config)
        self.view_resolution = views.view_resolution(self.resolution, len(self.cameras), self.view_layout)

    def __call__(self, position: int, slot: int) -> dict[str, np.ndarray] | None:
        episode_index, clip_slot = divmod(int(slot), self.clips_per_episode)
        try:
            episode = self.source[episode_index]
            u = np.random.default_rng([self.seed, self.dataset_index, position]).random()
            start = windowing.clip_start(
                len(episode), self.num_frames, self.frame_stride, clip_slot, self.clips_per_episode, u
            )
            if self.idle_threshold > 0 and windowing.is_idle(
                episode, start, (self.num_frames - 1) * self.frame_stride, self.idle_threshold,
                self.source.spec.layout(),
            ):
                count_idle_window(self.source.name)
                return None  # Grain drops None elements when iterating
            return windowing.make_clip(
                episode,
                start,
                num_frames=self.num_frames,
                frame_stride=self.frame_stride,
                resolution=self.resolution,
                dataset_stats=self.dataset_stats,
                proprio_dim=self.proprio_dim,
                action_normalization=self.action_normalization,
                dataset_index=self.dataset_index,
                wrist_camera=self.wrist_camera,
                action_horizon=self.action_horizon,
                proprio_chunk_frames=self.proprio_chunk_frames,
                action_dim=self.action_dim,
                embodiment=self.source.spec.layout(),
                frame_decoder=self._frame_decoder(episode) if self.cameras else None,
            )
        except BadRecordError as e:
            if not self.skip_bad_records:
                raise
            count_bad_record(e)
            return None  # Grain drops None elements when iterating

    def _frame_decoder(self, episode: Any) -> Any:
        """step -> the frame of every configured camera: tiled into one [H, W, 3], or [V, H, W, 3] for tokens."""

        def decode(step: int) -> np.ndarray:
            frames = np.stack([episode.decode_camera(c, step, self.view_resolution) for c in self.cameras])
            return views.tile_views(frames) if self.view_layout == "tile" else frames

        return decode


_IDLE: Counter[str] = Counter()
_IDLE_LOCK = threading.Lock()


def idle_threshold(config: ml_collections.ConfigDict, name: str) -> float:
    """Dataset `name`'s threshold in `data.idle_filter` ("NAME=T,..." or "*=T" for every dataset; 0: keep all)."""
    spec = str(config.get("idle_filter", "") or "")
    thresholds = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.rpartition("=")
        try:
            thresholds[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or thresholds[key] < 0:
            raise ValueError(f"data.idle_filter={spec!r}: {part!r} is not NAME=THRESHOLD (or *=THRESHOLD), "
                             f"THRESHOLD >= 0")
    return thresholds.get(name, thresholds.get("*", 0.0))


def count_idle_window(name: str) -> int:
    """Counts a window dropped as idle; logs at 1, 2, 4, 8, ... per dataset; returns this process's count."""
    with _IDLE_LOCK:
        _IDLE[name] += 1
        count = _IDLE[name]
    if count & (count - 1) == 0:
        logging.info("data: %d idle window(s) of %s dropped so far (data.idle_filter)", count, name)
    return count


def idle_window_counts() -> dict[str, int]:
    """Idle windows dropped so far in this process, per dataset (Grain workers count their own)."""
    with _IDLE_LOCK:
        return dict(_IDLE)


def resolve_stats(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Loads `config.stats_path`, or computes the statistics of `config.datasets` when it is empty."""
    names = config_lib.dataset_names(config)
    if config.stats_path:
        stats = stats_lib.load_stats(config.stats_path)
    else:
        logging.warning(
            "data.stats_path is empty: computing normalization stats of %s now (reads every episode; "
            "run `python -m data_pipelines.compute_stats` once instead)",
            names,
        )
        stats = stats_lib.compute_stats(
            config.data_dir,
            names,
            proprio_dim=config.proprio_dim,
            split=config.split,
            skip_bad_records=config.skip_bad_records,
        )
    missing = [n for n in names if n not in stats["datasets"]]
    if missing:
        raise KeyError(
            f"Normalization stats {config.stats_path or '(computed)'} lack datasets {missing}; they have "
            f"{sorted(stats['datasets'])}. Run `python -m data_pipelines.compute_stats` over the mixture."
        )
    if stats["proprio_dim"] != config.proprio_dim:
        raise ValueError(f"Stats have proprio_dim={stats['proprio_dim']}, config.data.proprio_dim={config.proprio_dim}")
    return stats


def _dataset_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def clip_source(
    config: ml_collections.ConfigDict, name: str, dataset_index: int, stats: dict[str, Any],
    *, evaluation: bool = False,
) -> grain.MapDataset:
    """An infinite, shuffled-per-epoch MapDataset of clips of dataset `name` (before mixing), without the
    episodes held out by `data.eval_fraction`; with `evaluation`, one unshuffled pass over those alone."""
    windowing.num_clip_actions(config.num_frames, config.frame_stride, config.get("action_horizon", 0))
    cameras = views.dataset_cameras(name, views.camera_names(config), config.data_dir)  # fails before reading
    source = episode_sources.open_episodes(
        config.data_dir, name, config.split, skip_bad_shards=config.skip_bad_records, cameras=cameras
    )
    if len(source) == 0:
        raise ValueError(f"Dataset {name!r} at {source.dataset_dir} has no episodes in split {config.split!r}")
    fraction = float(config.get("eval_fraction", 0.0))
    if fraction or evaluation:
        episodes = holdout.split_episodes(name, len(source), fraction, evaluation=evaluation)
        cpe = int(config.clips_per_episode)
        slots = grain.MapDataset.source([int(e) * cpe + c for e in episodes for c in range(cpe)])
    else:
        slots = grain.MapDataset.range(len(source) * config.clips_per_episode)
    loader = ClipLoader(source, dataset_index, stats["datasets"][name], config)
    if evaluation:
        return slots.map_with_index(loader)
    if config.shuffle:
        slots = slots.shuffle(seed=_dataset_seed(config.seed, name))
    return slots.repeat().map_with_index(loader)


def make_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
    stats: dict[str, Any] | None = None,
    extra_sources: list[tuple[grain.MapDataset, float]] | None = None,
) -> grain.IterDataset:
    """Per-process batches (numpy dicts of the batch contract) of the configured OXE mixture.

    Each process gets `batch_size / process_count` examples per batch, disjoint from other processes'.
    `extra_sources` are already-built (source, weight) pairs mixed in after the configured datasets.
    """
    config = data_config
    if config.batch_size % process_count:
        raise ValueError(f"data.batch_size={config.batch_size} is not divisible by process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    names = config_lib.dataset_names(config)
    for name in names:
        episode_sources.dataset_spec(config.data_dir, name)  # fail before reading episodes, naming the known datasets
        views.dataset_cameras(name, views.camera_names(config), config.data_dir)  # and a camera a dataset lacks
    stats = stats if stats is not None else resolve_stats(config)
    missing = [n for n in names if n not in stats["datasets"]]
    if missing:
        raise KeyError(f"Normalization stats lack datasets {missing}; they have {sorted(stats['datasets'])}")
    weights = mixture.mixture_weights(names, config.weights, config.balance_weights, stats)
    sources = [clip_source(config, name, i, stats) for i, name in enumerate(names)]
    for source, weight in extra_sources or []:
        sources.append(source)
        weights.append(weight)
    mixed = mixture.mix_sources(sources, weights)
    # Each process reads a contiguous block of every global batch: disjoint, and the same global batches
    # whatever the process count.
    shard = split_for_process(mixed, process_index, process_count, config.batch_size // process_count)
    read_options = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    dataset = shard.to_iter_dataset(read_options).batch(config.batch_size // process_count, drop_remainder=True)
    if config.worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) take defaults.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return dataset


def make_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
    stats: dict[str, Any] | None = None,
) -> grain.DatasetIterator:
    """Iterator over `make_dataset`; its `get_state()` / `set_state()` resume exactly."""
    dataset = make_dataset(data_config, process_index=process_index, process_count=process_count, stats=stats)
    return iter(dataset)
