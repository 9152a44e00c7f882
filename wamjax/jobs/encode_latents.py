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

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import pipeline
from data_pipelines.sources.latents import (
    CACHE_FORMAT,
    META_NAME,
    SHARD_NAME,
    SKIPPED_KEYS,
    data_layout,
    pack_example,
)
from data_pipelines.sources.synthetic import make_synthetic_dataset
from wamjax.checkpoint.wan_vae_import import load_vae
from wamjax.models.token_layout import views_into_batch, views_out_of_batch
from wamjax.models.vae import frames_to_video, vae_encode


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
    def encode_clips(p, frames):
        """[B, T, H, W, 3] -> [B, T', h, w, z], or with a views axis [B, T, V, H, W, 3] -> [B, T', V, h, w, z]."""
        video = frames_to_video(frames)
        if video.ndim == 6:
            return views_out_of_batch(vae_encode(vae_config, p, views_into_batch(video)), video.shape[2])
        return vae_encode(vae_config, p, video)

    encode = jax.jit(encode_clips)
    os.makedirs(out_dir, exist_ok=True)
    shard = os.path.join(out_dir, SHARD_NAME.format(0))
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
                example = {k: v[b] for k, v in batch.items() if k not in SKIPPED_KEYS}
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


def _config_batches(data: Any) -> tuple[Iterator[dict[str, np.ndarray]], dict[str, Any]]:
    """The data config's batch stream and the normalization stats it is normalized with ({} for synthetic)."""
    if data.get("source", "oxe") == "synthetic":
        return iter(make_synthetic_dataset(data, process_index=0, process_count=1)), {}
    stats = pipeline.resolve_stats(data)
    return iter(pipeline.make_dataset(data, stats=stats)), stats


def encode_run_cache(config: Any, out_dir: str, *, num_batches: int, dtype: Any = np.float32,
                     action_free: bool = False) -> int:
    """The latents cache of a run config: its data stream encoded with its VAE, with the layout and stats
    recorded (what the CLI writes); returns clips written."""
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
