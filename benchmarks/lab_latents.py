"""Which latent space keeps where things are, at what cost? The lab's pixel patches beside a random Wan VAE.

    python benchmarks/lab_latents.py --data_dir=DIR [--frames=600] [--vaes=tiny,pixels4]

On frames of a `wamjax.jobs.collect_sim` dataset (the primary camera at its recorded resolution), for each
VAE: parameters, encoder FLOPs and wall time per lab clip (5 frames, 2 views), the reconstruction PSNR of the
decoded first frame, and how linearly the latents of one frame give the scene's positions: ridge-regression R^2
on held-out frames (every fifth episode) of the end effector, the task object and the goal, read from the
episode's `observation/full_state` (Meta-World: xyz at [0:3], [4:7] and [36:39]).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
TARGETS = {"end effector": slice(0, 3), "object": slice(4, 7), "goal": slice(36, 39)}


def load_frames(data_dir: str, max_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 frames [N, H, W, 3], full states [N, 39], episode index [N]) every 4th step of every episode."""
    import tensorflow_datasets as tfds

    from data_pipelines.sources.rlds import find_dataset_dir

    source = tfds.builder_from_directory(find_dataset_dir(data_dir, "metaworld")).as_data_source()["train"]
    frames, states, episodes = [], [], []
    for index in range(len(source)):
        steps = list(source[index]["steps"])
        for step in steps[::4]:
            frames.append(np.asarray(step["observation"]["image"]))
            states.append(np.asarray(step["observation"]["full_state"], np.float32))
            episodes.append(index)
    picked = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    return np.stack(frames)[picked], np.stack(states)[picked], np.asarray(episodes)[picked]


def ridge_r2(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    """Held-out R^2 (mean over y's columns) of ridge regression, its strength picked on a slice of `train`."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    train_rows = np.flatnonzero(train)
    is_val = np.zeros(len(train_rows), bool)
    is_val[::5] = True  # every fifth training frame picks the ridge strength
    fit, val, test = train_rows[~is_val], train_rows[is_val], np.flatnonzero(~train)

    def solve(rows: np.ndarray, alpha: float) -> np.ndarray:
        a = x[rows]
        gram = a @ a.T + alpha * np.eye(len(rows))  # dual form: features outnumber frames
        return a.T @ np.linalg.solve(gram, y[rows] - y[rows].mean(0))

    def r2(weights: np.ndarray, rows: np.ndarray, offset: np.ndarray) -> float:
        pred = x[rows] @ weights + offset
        resid = ((y[rows] - pred) ** 2).sum(0)
        total = ((y[rows] - y[rows].mean(0)) ** 2).sum(0) + 1e-12
        return float(np.mean(1 - resid / total))

    best = max((10.0**k for k in range(-1, 6)), key=lambda a: r2(solve(fit, a), val, y[fit].mean(0)))
    rows = np.concatenate([fit, val])
    return r2(solve(rows, best), test, y[rows].mean(0))


def main(argv: Sequence[str]) -> None:
    del argv
    from wamjax.flops.encoders import vae_encode_flops
    from wamjax.models import vae as vae_lib

    frames, states, episodes = load_frames(FLAGS.data_dir, FLAGS.frames)
    train = episodes % 5 != 0  # every fifth episode held out (collect_sim writes the tasks one after another)
    h, w = frames.shape[1:3]
    print(f"# {len(frames)} frames of {len(np.unique(episodes))} episodes at {h}x{w} "
          f"(held out: {int((~train).sum())} frames of every fifth episode); backend {jax.default_backend()}")
    header = ["vae", "latent / view", "params", "GFLOPs / clip", "ms / clip", "PSNR dB", *(f"R2 {t}" for t in TARGETS)]
    rows = []
    for name in FLAGS.vaes:
        cfg, params = vae_lib.vae_config_for(name), None
        params = vae_lib.init_vae_params(cfg, jax.random.key(1234))
        count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
        video = vae_lib.frames_to_video(jnp.asarray(frames))[:, None]  # each frame a 1-frame clip
        latents = np.concatenate([np.asarray(vae_lib.vae_encode(cfg, params, video[i:i + 64]))
                                  for i in range(0, len(video), 64)])
        decoded = np.asarray(vae_lib.vae_decode(cfg, params, jnp.asarray(latents[:64])))
        mse = float(np.mean((decoded - np.asarray(video[:64])) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)
        clip = jax.random.uniform(jax.random.key(0), (2, 5, h, w, 3), minval=-1.0, maxval=1.0)  # 2 views
        vae_lib.vae_encode(cfg, params, clip).block_until_ready()
        start = time.perf_counter()
        for _ in range(3):
            vae_lib.vae_encode(cfg, params, clip).block_until_ready()
        ms = (time.perf_counter() - start) / 3 * 1e3
        features = latents.reshape(len(latents), -1)
        r2 = [ridge_r2(features, states[:, s], train) for s in TARGETS.values()]
        rows.append([name, "x".join(str(d) for d in latents.shape[2:]), f"{count:,}",
                     f"{2 * vae_encode_flops(cfg, 5, (h, w)) / 1e9:.3f}", f"{ms:.1f}", f"{psnr:.1f}",
                     *(f"{v:.3f}" for v in r2)])
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for line in (header, ["-" * x for x in widths], *rows):
        print("  ".join(c.ljust(x) for c, x in zip(line, widths, strict=True)).rstrip())


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", None, "A collect_sim dataset directory.")
    flags.DEFINE_integer("frames", 600, "Frames to probe.")
    flags.DEFINE_list("vaes", ["tiny", "pixels4"], "vae.size values to compare.")
    flags.mark_flag_as_required("data_dir")
    app.run(main)
