"""Offline job: encode a run's clips once with its frozen VAE and store latents to train from.

    python -m wamjax.jobs.encode_latents --config=configs/wam.py:size=tiny --out=DIR --num_batches=N

Batches come from the run's data config (`data.source` synthetic or oxe, through data_pipelines.pipeline)
and the VAE from its `vae` block (`vae.weights`, else a random `vae.size` VAE seeded with `vae.seed`, the
same one the trainer builds). Train from the result with `--config.data.latents_cache=DIR`.

A cache directory holds `latents-*.array_record` (one record per clip in openpi's msgpack-numpy encoding,
`wamjax.msgpack_numpy`: the batch contract with `frames` replaced by `latents`, float
[T', H', W', z_dim] (or [T', V, H', W', z_dim], each camera view encoded alone, for data.view_layout=tokens),
unnormalized like `vae_encode`'s output; `wrist_frames` is dropped) and
`latents_cache.json` (format, VAE config, shapes, example count, the data layout the clips were cut with, and
the normalization stats their actions and states were normalized with). A run training from the cache must
use the same layout and stats (each difference refused by name); its checkpoints carry the cache's stats.
The stored clips are a fixed sample of the stream: training from them repeats those clips every epoch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from wamjax import msgpack_numpy

# v2: records in openpi's msgpack-numpy encoding; v3: the data layout and normalization stats are recorded
CACHE_FORMAT = "wamjax.latents_cache.v3"
META_NAME = "latents_cache.json"
_SHARD_NAME = "latents-{:05d}.array_record"
_SKIPPED_KEYS = ("frames", "wrist_frames")
# The data settings that shape a cached example; a run reading the cache must have the same ones.
LAYOUT_KEYS = ("source", "datasets", "resolution", "num_frames", "frame_stride", "action_horizon", "proprio_dim",
               "proprio_chunk_frames", "cameras", "view_layout")


def data_layout(data_config: Any) -> dict[str, Any]:
    """The settings of `config.data` that shape a cached example, as JSON values (datasets as a list)."""
    from data_pipelines.config import dataset_names

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


def encode_batches(
    batches: Iterable[dict[str, np.ndarray]],
    vae_config: Any,
    params: Any,
    out_dir: str,
    *,
    num_batches: int,
    dtype: Any = np.float32,
    metadata: dict[str, Any] | None = None,
    action_free: bool = False,
) -> int:
    """Encodes `num_batches` contract batches' `frames` and writes the cache to `out_dir`; returns clips written.

    `batches` is any iterable of batch-contract dicts (e.g. `data_pipelines.pipeline.make_dataset(...)`).
    `action_free` drops the actions (zeros, `has_actions` False, the mask all False): videos to pretrain or
    co-train on, their action loss masked.
    """
    import jax
    from array_record.python.array_record_module import ArrayRecordWriter

    from wamjax.models.token_layout import views_into_batch, views_out_of_batch
    from wamjax.models.vae import frames_to_video, vae_encode

    def encode_clips(p, frames):
        """[B, T, H, W, 3] -> [B, T', h, w, z], or with a views axis [B, T, V, H, W, 3] -> [B, T', V, h, w, z]."""
        video = frames_to_video(frames)
        if video.ndim == 6:
            return views_out_of_batch(vae_encode(vae_config, p, views_into_batch(video)), video.shape[2])
        return vae_encode(vae_config, p, video)

    encode = jax.jit(encode_clips)
    os.makedirs(out_dir, exist_ok=True)
    shard = os.path.join(out_dir, _SHARD_NAME.format(0))
    tmp = shard + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    shapes: set[tuple[int, ...]] = set()
    try:
        for index, batch in enumerate(batches):
            if index >= num_batches:
                break
            if "frames" not in batch:
                raise KeyError(f"batch {index} has no 'frames' (keys {sorted(batch)}); expected the batch contract")
            latents = np.asarray(encode(params, np.asarray(batch["frames"]))).astype(dtype)
            shapes.add(latents.shape[1:])
            for b in range(latents.shape[0]):
                example = {k: v[b] for k, v in batch.items() if k not in _SKIPPED_KEYS}
                example["latents"] = latents[b]
                if action_free:
                    example["actions"] = np.zeros_like(example["actions"])
                    example["action_mask"] = np.zeros_like(example["action_mask"])
                    example["has_actions"] = np.bool_(False)
                writer.write(pack_example(example))
                count += 1
    finally:
        writer.close()
    if len(shapes) > 1:
        raise ValueError(f"batches gave latents of different shapes {sorted(shapes)}; expected one clip shape")
    os.replace(tmp, shard)
    # The metadata is written last: a cache directory without it is refused (not a cache), never half read.
    meta = {
        "format": CACHE_FORMAT,
        "num_examples": count,
        "latent_shape": list(shapes.pop()) if shapes else None,
        "vae": vae_config.to_dict(),
        "normalized": False,
        "dtype": np.dtype(dtype).name,
        "shards": [os.path.basename(shard)],
        "action_free": bool(action_free),
    } | (metadata or {})
    with open(os.path.join(out_dir, META_NAME), "w") as f:
        json.dump(meta, f, indent=1)
    return count


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
    from data_pipelines.standardize import stats as stats_lib

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


class LatentsCacheSource:
    """Random-access examples of a latents cache (Grain data source; picklable)."""

    def __init__(self, cache_dir: str, vae_config: Any | None = None):
        self.cache_dir = cache_dir
        self.metadata = read_cache_metadata(cache_dir)
        if vae_config is not None and self.metadata["vae"] != vae_config.to_dict():
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

    from data_pipelines.clips.process_split import split_for_process

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


def _config_batches(data: Any) -> tuple[Iterator[dict[str, np.ndarray]], dict[str, Any]]:
    """The data config's batch stream and the normalization stats it is normalized with ({} for synthetic)."""
    if data.get("source", "oxe") == "synthetic":
        from data_pipelines.sources.synthetic import make_synthetic_dataset

        return iter(make_synthetic_dataset(data, process_index=0, process_count=1)), {}
    from data_pipelines import pipeline

    stats = pipeline.resolve_stats(data)
    return iter(pipeline.make_dataset(data, stats=stats)), stats


def encode_run_cache(config: Any, out_dir: str, *, num_batches: int, dtype: Any = np.float32,
                     action_free: bool = False) -> int:
    """The latents cache of a run config: its data stream encoded with its VAE, with the layout and stats
    recorded (what the CLI writes); returns clips written."""
    from wamjax.checkpoint.wan_vae_import import load_vae

    vae_config, params = load_vae(config.vae.size, config.vae.weights, config.vae.seed)
    data = config.data
    batches, stats = _config_batches(data)
    return encode_batches(
        batches, vae_config, params, out_dir, num_batches=num_batches, dtype=dtype, action_free=action_free,
        metadata={
            "vae_weights": config.vae.weights,
            "vae_seed": int(config.vae.seed),
            "data": data_layout(data),
            "norm_stats": stats,
            "stats_path": str(data.get("stats_path", "")),
        },
    )


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    if not FLAGS.out:
        raise ValueError("--out is required: the directory to write the latents cache to")
    count = encode_run_cache(FLAGS.config, FLAGS.out, num_batches=FLAGS.num_batches, dtype=np.dtype(FLAGS.dtype),
                             action_free=FLAGS.action_free)
    print(f"Wrote latents of {count} clips to {FLAGS.out}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    config_flags.DEFINE_config_file("config", None, "Training config file (e.g. configs/wam.py:size=tiny).")
    flags.DEFINE_string("out", None, "Directory to write the latents cache to.")
    flags.DEFINE_integer("num_batches", 1, "Batches of data.batch_size clips to encode.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of the latents.")
    flags.DEFINE_bool("action_free", False, "Drop the actions (has_actions False): videos to pretrain or co-train "
                      "on with the action loss masked.")
    flags.mark_flag_as_required("config")
    app.run(main)
