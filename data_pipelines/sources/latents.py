"""Reading a latents cache written by `python -m wamjax.jobs.encode_latents`: its format, its recorded data
layout and normalization stats, and a Grain source over its examples.

A cache directory holds `latents-*.array_record` (one record per clip in openpi's msgpack-numpy encoding: the
batch contract with `frames` replaced by `latents`, float [T', H', W', z_dim] (or [T', V, H', W', z_dim] for
data.view_layout=tokens), unnormalized; `wrist_frames` is dropped) and `latents_cache.json` (format, VAE config,
shapes, example count, the data layout the clips were cut with, and the normalization stats their actions and
states were normalized with). A run training from the cache must use the same layout and stats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.clips.process_split import split_for_process
from data_pipelines.config import dataset_names
from data_pipelines.standardize import stats as stats_lib
from wamjax import msgpack_numpy

# v2: records in openpi's msgpack-numpy encoding; v3: the data layout and normalization stats are recorded
CACHE_FORMAT = "wamjax.latents_cache.v3"
META_NAME = "latents_cache.json"
SHARD_NAME = "latents-{:05d}.array_record"
SKIPPED_KEYS = ("frames", "wrist_frames")
# The data settings that shape a cached example; a run reading the cache must have the same ones.
LAYOUT_KEYS = ("source", "datasets", "resolution", "num_frames", "frame_stride", "action_horizon", "proprio_dim",
               "proprio_chunk_frames", "cameras", "view_layout")


def data_layout(data_config: Any) -> dict[str, Any]:
    """The settings of `config.data` that shape a cached example, as JSON values (datasets as a list)."""
    layout = {}
    for key in LAYOUT_KEYS:
        value = data_config.get(key, None)
        if key == "datasets":
            value = dataset_names(data_config) if data_config.get("source", "oxe") != "synthetic" else []
        elif isinstance(value, tuple | list):
            value = list(value)
        layout[key] = value
    return layout


def pack_example(example: dict[str, np.ndarray]) -> bytes:
    """One example (dict of numpy arrays / unicode scalars) -> msgpack-numpy bytes (openpi's encoding)."""
    return msgpack_numpy.packb({key: np.asarray(value) for key, value in example.items()})


def unpack_example(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `pack_example`: writable arrays; strings as numpy str scalars."""
    out = {}
    for key, value in msgpack_numpy.unpackb(data).items():
        out[key] = value[()] if value.dtype.kind == "U" and value.ndim == 0 else value.copy()
    return out


def read_cache_metadata(cache_dir: str) -> dict[str, Any]:
    """The cache's `latents_cache.json`, checked for format."""
    path = os.path.join(cache_dir, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: {cache_dir} is not a latents cache; build one with "
            "`python -m wamjax.jobs.encode_latents`"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; expected {CACHE_FORMAT!r} "
                         "(re-encode it with `python -m wamjax.jobs.encode_latents`)")
    return meta


def check_cache_layout(cache_dir: str, meta: dict[str, Any], data_config: Any) -> None:
    """Raises unless the run's data settings (`data_config`) are those the cache's clips were cut with."""
    recorded = meta.get("data", {})
    wanted = data_layout(data_config)
    diffs = [f"data.{key}: cache {recorded.get(key)!r}, run {wanted[key]!r}" for key in LAYOUT_KEYS
             if recorded.get(key) != wanted[key]]
    if diffs:
        raise ValueError(f"latents cache {cache_dir} was built for other data settings than this run's "
                         f"({'; '.join(diffs)}): re-encode it with this run's config, or match the run to it")


def cache_dirs(latents_cache: str | Sequence[str]) -> list[str]:
    """`data.latents_cache` as a list of cache directories (one, or several comma-separated to mix)."""
    names = latents_cache.split(",") if isinstance(latents_cache, str) else list(latents_cache)
    return [n.strip() for n in names if n.strip()]


def cache_weights(data_config: Any, count: int) -> list[float]:
    """`data.latents_cache_weights` (one per cache; empty: equal), checked."""
    weights = [float(w) for w in (data_config.get("latents_cache_weights", ()) or ())]
    if not weights:
        return [1.0] * count
    if len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"data.latents_cache_weights={tuple(weights)}: expected {count} non-negative weights "
                         f"(one per cache of data.latents_cache) summing to more than 0")
    return weights


def cache_norm_stats(latents_cache: str | Sequence[str], data_config: Any) -> dict[str, Any]:
    """The normalization stats the caches' actions and states were normalized with ({} for synthetic data).

    Mixed caches must share them; with `data.stats_path` set the file's stats must equal the caches'; a
    difference is refused naming both.
    """
    dirs = cache_dirs(latents_cache)
    stats = _one_cache_norm_stats(dirs[0], data_config)
    for other in dirs[1:]:
        if _one_cache_norm_stats(other, data_config) != stats:
            raise ValueError(f"latents caches {dirs[0]} and {other} were normalized with different stats; caches "
                             "mixed in one stage must share them (encode both with the same data.stats_path)")
    return stats


def _one_cache_norm_stats(cache_dir: str, data_config: Any) -> dict[str, Any]:
    meta = read_cache_metadata(cache_dir)
    stats = meta.get("norm_stats") or {}
    if data_config.get("stats_path"):
        wanted = stats_lib.load_stats(data_config.stats_path)
        if wanted != stats:
            raise ValueError(
                f"latents cache {cache_dir} was normalized with the stats of "
                f"{meta.get('stats_path') or '(stats computed at encoding)'}; this run's data.stats_path "
                f"{data_config.stats_path} holds different stats: re-encode the cache with them, or train with "
                f"data.stats_path={meta.get('stats_path') or ''!r}"
            )
    return stats


def _recorded_vae(recorded: dict[str, Any]) -> dict[str, Any]:
    """A cache's recorded VAE config as `to_dict` writes it today (a Wan VAE recorded before a field existed
    reads as that field's default)."""
    if "kind" in recorded:  # pixel patches
        return recorded
    from wamjax.models.vae import VAEConfig  # JAX, only when a Wan VAE config is compared

    return VAEConfig.from_dict(recorded).to_dict()


class LatentsCacheSource:
    """Random-access examples of a latents cache (Grain data source; picklable)."""

    def __init__(self, cache_dir: str, vae_config: Any | None = None):
        self.cache_dir = cache_dir
        self.metadata = read_cache_metadata(cache_dir)
        if vae_config is not None and _recorded_vae(self.metadata["vae"]) != vae_config.to_dict():
            raise ValueError(
                f"latents cache {cache_dir} was encoded with VAE config {self.metadata['vae']}; "
                f"this run's VAE config is {vae_config.to_dict()}"
            )
        import grain

        self._source = grain.sources.ArrayRecordDataSource(
            [os.path.join(cache_dir, name) for name in self.metadata["shards"]]
        )
        if len(self._source) != self.metadata["num_examples"]:
            raise ValueError(
                f"latents cache {cache_dir} holds {len(self._source)} records; "
                f"{META_NAME} says {self.metadata['num_examples']}"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return unpack_example(self._source[index])


def make_latents_dataset(
    cache_dir: str | Sequence[str],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    vae_config: Any | None = None,
    data_config: Any | None = None,
) -> Any:
    """Per-process batches (batch contract, `latents` instead of `frames`) of a latents cache, as a Grain
    IterDataset; each process gets `batch_size / process_count` disjoint examples per batch.

    With `data_config` (the run's `config.data`) the cache must have been cut with the same data settings.
    Several caches (a list, or comma-separated) are mixed by `data.latents_cache_weights` (equal without it),
    each shuffled and repeated on its own; e.g. demonstrations and action-free videos (co-training)."""
    import grain

    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    dirs = cache_dirs(cache_dir)
    datasets = []
    for index, directory in enumerate(dirs):
        source = LatentsCacheSource(directory, vae_config)
        if data_config is not None:
            check_cache_layout(directory, source.metadata, data_config)
        dataset = grain.MapDataset.source(source)
        if shuffle:
            dataset = dataset.shuffle(seed=seed + index)
        datasets.append(dataset.repeat(num_epochs if len(dirs) == 1 else None))
    if len(datasets) == 1:
        dataset = datasets[0]
    else:
        weights = cache_weights(data_config, len(dirs)) if data_config is not None else [1.0] * len(dirs)
        dataset = grain.MapDataset.mix(datasets, weights)
    dataset = split_for_process(dataset, process_index, process_count, batch_size // process_count)
    return dataset.to_iter_dataset().batch(batch_size // process_count, drop_remainder=True)
