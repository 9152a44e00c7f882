"""Throughput of the OXE input pipeline, and how much of a tiny training step waits for data.

    python benchmarks/data_pipeline.py [--episodes=6] [--batches=12] [--workers=1,2,4] [--measure=shard_check]

Generates OXE-format data (bridge at its published 480x640, fractal at 256x320) in a temp folder,
then prints clips/s and MB/s of decoded frames for each worker count at the tiny (32x32) and a
480x640 output resolution, the share of a tiny jitted training step spent waiting in `next()`, and
what opening a dataset costs with its per-shard readability check (`data_pipelines.sources.shards`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from data_pipelines import config as config_lib
from data_pipelines import make_oxe_like, pipeline
from data_pipelines.sources import shards
from data_pipelines.sources.rlds import EpisodeSource
from data_pipelines.standardize import stats as stats_lib

FLAGS = flags.FLAGS
DATASETS = ["bridge", "fractal20220817_data"]


def _data_config(data_dir: str, stats_path: str, resolution: tuple[int, int], workers: int):
    config = config_lib.get_data_config()
    config.update(
        data_dir=data_dir,
        stats_path=stats_path,
        datasets=",".join(DATASETS),
        resolution=resolution,
        batch_size=8,
        worker_count=workers,
    )
    return config


def throughput(config, batches: int) -> tuple[float, float]:
    """(clips/s, MB/s of decoded frames) once every worker has delivered (start-up excluded)."""
    iterator = pipeline.make_iterator(config)
    for _ in range(2 * max(config.worker_count, 1)):
        next(iterator)
    start, clips, nbytes = time.perf_counter(), 0, 0
    for _ in range(batches):
        batch = next(iterator)
        clips += len(batch["frames"])
        nbytes += batch["frames"].nbytes
    elapsed = time.perf_counter() - start
    return clips / elapsed, nbytes / elapsed / 1e6


def _tiny_step():
    """A tiny jitted training step: a linear action predictor from pooled frames, trained with Adam."""
    optimizer = optax.adam(1e-3)

    def loss_fn(params, frames, actions):
        pooled = frames.astype(jnp.float32).mean(axis=(2, 3)).reshape(frames.shape[0], -1) / 255.0
        hidden = jnp.tanh(pooled @ params["w1"])
        prediction = (hidden @ params["w2"]).reshape(actions.shape)
        return jnp.mean((prediction - actions) ** 2)

    @jax.jit
    def step(params, opt_state, frames, actions):
        loss, grads = jax.value_and_grad(loss_fn)(params, frames, actions)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def wait_share(config, steps: int) -> tuple[float, float]:
    """(share of wall time spent in next(), ms per step) over `steps` tiny training steps."""
    iterator = pipeline.make_iterator(config)
    for _ in range(2 * max(config.worker_count, 1)):
        batch = next(iterator)
    t, a = batch["frames"].shape[1], batch["actions"].shape[1:]
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(t * 3, 256)) * 0.1, jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(256, int(np.prod(a)))) * 0.1, jnp.float32),
    }
    optimizer, step = _tiny_step()
    opt_state = optimizer.init(params)
    params, opt_state, loss = step(params, opt_state, batch["frames"], batch["actions"])
    loss.block_until_ready()  # compile outside the timed loop
    waiting, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(iterator)
        waiting += time.perf_counter() - t0
        params, opt_state, loss = step(params, opt_state, batch["frames"], batch["actions"])
        loss.block_until_ready()
    total = time.perf_counter() - start
    return waiting / total, 1e3 * total / steps


def shard_check_cost(workdir: str, num_shards: int, repeats: int = 5) -> tuple[float, float, float]:
    """(ms to open a `num_shards`-shard dataset as training does, ms of that in the shard check, ms that
    Grain's ArrayRecord source takes to open and count the same shards itself, which the check replaces);
    best of `repeats`, so warm file caches: a network filesystem adds its latency per shard."""
    data_dir = f"{workdir}/sharded"
    make_oxe_like.make_datasets(
        data_dir, ["bridge"], episodes=num_shards, image_size=(16, 20), min_steps=4, max_steps=4, num_shards=num_shards
    )
    open_s = check_s = grain_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        source = EpisodeSource(data_dir, "bridge")
        open_s = min(open_s, time.perf_counter() - start)
        start = time.perf_counter()
        shards.check_shards("bridge", source.filenames)
        check_s = min(check_s, time.perf_counter() - start)
        start = time.perf_counter()
        grain.sources.ArrayRecordDataSource(source.filenames)
        grain_s = min(grain_s, time.perf_counter() - start)
    assert len(source.filenames) == num_shards
    return 1e3 * open_s, 1e3 * check_s, 1e3 * grain_s


def main(argv: Sequence[str]) -> None:
    del argv
    workdir = tempfile.mkdtemp(prefix="oxe_bench_")
    try:
        if "shard_check" in FLAGS.measure:
            open_ms, check_ms, grain_ms = shard_check_cost(workdir, FLAGS.shards)
            print(
                f"opening a {FLAGS.shards}-shard dataset: {open_ms:.1f} ms, of which the shard check "
                f"{check_ms:.1f} ms ({check_ms / FLAGS.shards:.2f} ms/shard); Grain's ArrayRecord source "
                f"opening and counting the same shards itself (what the check replaces): {grain_ms:.1f} ms",
                flush=True,
            )
        if not {"throughput", "wait"} & set(FLAGS.measure):
            return
        make_oxe_like.make_datasets(workdir, DATASETS, episodes=FLAGS.episodes, seed=0)  # published shapes
        stats_path = f"{workdir}/stats.json"
        stats_lib.save_stats(stats_lib.compute_stats(workdir, DATASETS), stats_path)
        print(f"devices: {jax.devices()[0].platform} x{jax.device_count()}, batch 8 clips of 9 frames")
        if "throughput" in FLAGS.measure:
            print(f"{'resolution':>10} {'workers':>7} {'clips/s':>8} {'MB/s':>8}")
        for resolution in ((32, 32), (480, 640)) if "throughput" in FLAGS.measure else ():
            for workers in FLAGS.workers:
                config = _data_config(workdir, stats_path, resolution, int(workers))
                clips, mbps = throughput(config, FLAGS.batches)
                print(f"{'x'.join(map(str, resolution)):>10} {workers:>7} {clips:8.1f} {mbps:8.1f}", flush=True)
        for workers in (0, 2) if "wait" in FLAGS.measure else ():
            share, ms = wait_share(_data_config(workdir, stats_path, (32, 32), workers), FLAGS.batches)
            print(f"tiny step at 32x32, workers={workers}: {ms:.1f} ms/step, {100 * share:.0f}% waiting for data")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    flags.DEFINE_integer("episodes", 6, "Episodes generated per dataset.")
    flags.DEFINE_integer("batches", 12, "Timed batches per configuration.")
    flags.DEFINE_list("workers", ["0", "1", "2", "4"], "Grain worker counts to measure (0: in-process).")
    flags.DEFINE_multi_enum(
        "measure", ["throughput", "wait", "shard_check"], ["throughput", "wait", "shard_check"], "What to measure."
    )
    flags.DEFINE_integer("shards", 256, "Shards of the dataset whose opening is timed (shard_check).")
    app.run(main)
