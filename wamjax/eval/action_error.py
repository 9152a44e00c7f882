"""Does a policy look? Its first action chunk's error on recorded episodes, with its camera and without.

    python -m wamjax.eval.offline --checkpoint=WORKDIR/checkpoints --vision_ablation [--data_dir=DIR]

For windows spread over a dataset's episodes (the held-out ones when the run holds some out, else all), the
policy gets the window's first frame of every camera, the raw state and the instruction, and predicts the clip's
action chunk; its mean absolute error against the recorded chunk (aligned as training aligned it: averaged over
`data.frame_stride`, or every step with `data.action_horizon`) is reported in the dataset's raw units over the
normalized action dimensions (the gripper is left out), for:
  camera           the real frames;
  blank            every camera replaced by a black frame;
  other_episode    every camera replaced by the same position in another episode;
  mean_action      no model: the dataset's mean action at every step (the constant baseline).
A policy that uses its camera loses accuracy without it; one that fits from state and instruction alone does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.clips import holdout, views, windowing
from data_pipelines.sources.episodes import open_episodes
from data_pipelines.sources.rlds import Episode
from data_pipelines.standardize.stats import unnormalize

ABLATIONS = ("camera", "blank", "other_episode")
ROWS = (*ABLATIONS, "mean_action")


def window_starts(length: int, num_frames: int, frame_stride: int, count: int) -> list[int]:
    """`count` clip starts spread evenly over an episode of `length` steps (the middle of each stratum)."""
    return sorted({windowing.clip_start(length, num_frames, frame_stride, slot, count, 0.5) for slot in range(count)})


def _camera_frames(episode: Episode, cameras: Sequence[str], step: int) -> list[np.ndarray]:
    if not cameras:
        return [episode.decode_frame(step, None)]
    return [episode.decode_camera(c, step, None) for c in cameras]


def action_windows(
    data_config: Any,
    dataset: str,
    stats: dict[str, Any],
    *,
    max_episodes: int = 8,
    windows_per_episode: int = 2,
) -> list[dict[str, Any]]:
    """Windows spread over `max_episodes` of `dataset`'s episodes, evenly spaced (of the held-out ones when
    `data.eval_fraction` > 0, else of all).

    Each is {"episode": its index, "frames": [per-camera uint8 [H, W, 3]], "other_frames": the same cameras at
    the same step of the next episode, "proprio": raw [p], "instruction", "truth": the raw [T_a, A] chunk (A: the
    dataset embodiment's own dimensions) aligned as training aligns it, "mask": [T_a] bool (recorded actions)}.
    `stats` is the dataset's entry of the run's normalization stats.
    """
    num_frames, stride = int(data_config.num_frames), int(data_config.frame_stride)
    horizon = int(data_config.get("action_horizon", 0))
    normalization = str(data_config.action_normalization)
    cameras = views.dataset_cameras(dataset, views.camera_names(data_config), data_config.data_dir)
    source = open_episodes(data_config.data_dir, dataset, data_config.split, cameras=cameras)
    layout = source.spec.layout()
    fraction = float(data_config.get("eval_fraction", 0.0))
    indices = holdout.split_episodes(dataset, len(source), fraction, evaluation=True) if fraction else np.arange(
        len(source))
    # Spread over the dataset (episodes of several tasks are stored one task after another).
    indices = np.asarray(indices)[np.unique(np.linspace(0, len(indices) - 1, min(max_episodes, len(indices)))
                                            .round().astype(int))]
    episodes = [source[int(i)] for i in indices]
    if len(episodes) < 2:
        raise ValueError(f"{dataset}: {len(episodes)} episode(s) to evaluate; the other_episode input needs >= 2")
    windows = []
    for e, episode in enumerate(episodes):
        other = episodes[(e + 1) % len(episodes)]
        for start in window_starts(len(episode), num_frames, stride, windows_per_episode):
            # make_clip aligns (and normalizes) the chunk exactly as training does; its frames are not needed.
            clip = windowing.make_clip(
                episode, start, num_frames=num_frames, frame_stride=stride, resolution=(1, 1),
                dataset_stats=stats, proprio_dim=len(stats["proprio"]["mean"]), action_normalization=normalization,
                dataset_index=0, wrist_camera=False, action_horizon=horizon,
                frame_decoder=lambda step: np.zeros((1, 1, 3), np.uint8),
                action_dim=len(stats["action"]["mask"]), embodiment=layout,
            )
            if not clip["action_mask"].any():
                continue
            windows.append({
                "episode": int(indices[e]),
                "frames": _camera_frames(episode, cameras, start),
                "other_frames": _camera_frames(other, cameras, min(start, len(other) - 1)),
                "proprio": np.asarray(episode.proprio[start], np.float32),
                "instruction": episode.instruction,
                "truth": layout.to_absolute(unnormalize(clip["actions"], stats["action"], normalization),
                                            episode.proprio[start]),
                "mask": clip["action_mask"],
            })
    if not windows:
        raise ValueError(f"{dataset}: no window of {len(episodes)} episodes has a recorded action")
    return windows


def window_inputs(window: dict[str, Any], ablation: str) -> list[np.ndarray]:
    """The camera frames a policy gets for `window` under `ablation` (one of `ABLATIONS`)."""
    if ablation == "camera":
        return window["frames"]
    if ablation == "blank":
        return [np.zeros_like(f) for f in window["frames"]]
    if ablation == "other_episode":
        return window["other_frames"]
    raise ValueError(f"ablation {ablation!r}; expected one of {ABLATIONS}")


def chunk_errors(predicted: Sequence[np.ndarray], windows: Sequence[dict[str, Any]], dims: Sequence[int]) -> np.ndarray:
    """|predicted - recorded| [N, len(dims)] over every recorded action of the windows' chunks (raw units)."""
    dims = np.asarray(dims)
    rows = []
    for actions, window in zip(predicted, windows, strict=True):
        actions = np.asarray(actions, np.float32)
        if actions.shape != window["truth"].shape:
            raise ValueError(f"predicted chunk has shape {actions.shape}; the recorded one {window['truth'].shape}")
        mask = window["mask"]
        rows.append(np.abs(actions[mask][:, dims] - window["truth"][mask][:, dims]))
    return np.concatenate(rows)


def summarize_errors(dataset: str, windows: Sequence[dict[str, Any]], dims: Sequence[int],
                     errors: dict[str, np.ndarray]) -> dict[str, Any]:
    """The result dict of `policy_action_error` from per-row error arrays."""
    per_dim = {row: e.mean(0) for row, e in errors.items()}
    return {
        "dataset": dataset, "episodes": len({w["episode"] for w in windows}), "windows": len(windows),
        "dims": [int(d) for d in dims],
        "mae": {row: float(v.mean()) for row, v in per_dim.items()},
        "mae_per_dim": {row: [float(x) for x in v] for row, v in per_dim.items()},
    }


def policy_action_error(
    policy: Any,
    data_config: Any,
    dataset: str,
    *,
    max_episodes: int = 8,
    windows_per_episode: int = 2,
    ablations: Sequence[str] = ABLATIONS,
) -> dict[str, Any]:
    """Mean absolute error of `policy.infer`'s chunk on `dataset`'s episodes per row of `ROWS` (raw units).

    `data_config` is the run's data config (`data_dir`, split, clip shape, cameras, `eval_fraction`);
    `policy` a `wamjax.inference.policy.Policy` holding that dataset's stats. Returns
    {"dataset", "episodes", "windows", "dims", "mae": {row: float}, "mae_per_dim": {row: [float]}}.
    """
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"ablations {unknown}; expected some of {ABLATIONS}")
    if policy.stats is None:
        raise ValueError("the policy has no normalization stats (a synthetic-data run): its actions have no raw "
                         "units to compare against recorded episodes")
    stats = policy.stats
    windows = action_windows(data_config, dataset, stats, max_episodes=max_episodes,
                             windows_per_episode=windows_per_episode)
    dims = mean_action_dims(stats)
    errors = {}
    for row in ablations:
        predicted = []
        for window in windows:
            frames = window_inputs(window, row)
            predicted.append(policy.infer(frames if len(frames) > 1 else frames[0], window["proprio"],
                                          window["instruction"])["actions"])
        errors[row] = chunk_errors(predicted, windows, dims)
    errors["mean_action"] = mean_action_errors(stats, windows)
    return summarize_errors(dataset, windows, dims, errors)


def mean_action_dims(stats: dict[str, Any]) -> list[int]:
    """The normalized action dimensions of a dataset's stats (the gripper and unused dimensions left out)."""
    return [int(d) for d in np.flatnonzero(np.asarray(stats["action"]["mask"], bool))]


def mean_action_errors(stats: dict[str, Any], windows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The constant baseline's errors: the dataset's mean action at every step of every window."""
    mean = np.asarray(stats["action"]["mean"], np.float32)
    return chunk_errors([np.broadcast_to(mean, w["truth"].shape) for w in windows], windows, mean_action_dims(stats))


def format_action_error(result: dict[str, Any]) -> str:
    """A small table of `policy_action_error`'s result, one row per input."""
    base = result["mae"]["mean_action"]
    lines = [f"\n{result['dataset']}: {result['windows']} windows of {result['episodes']} episodes, "
             f"action dims {result['dims']} (raw units)",
             f"  {'input':<15} {'MAE':>8} {'/ mean-action':>14}"]
    for row, value in result["mae"].items():
        lines.append(f"  {row:<15} {value:8.4f} {value / base if base else float('nan'):14.3f}")
    return "\n".join(lines)
