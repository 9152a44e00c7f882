"""Collects scripted-expert episodes in a simulator and writes them as one TFDS/RLDS dataset.

    python -m wamjax.jobs.collect_sim --env=metaworld --tasks=reach-v3,push-v3 --episodes=20 --out=DIR \
        [--resolution=128,128] [--seed=0]

Writes `DIR/metaworld/<version>/` (ArrayRecord, what `data_pipelines.sources.rlds` reads) in OXE conventions:
per step the primary camera (`observation/image`, the right way up) and the gripper camera
(`observation/wrist_image`) as JPEG, `observation/state` (end-effector xyz + gripper opening, Meta-World's
`obs[0:4]`), `observation/full_state` (all 39 values), the 4-D `action` the environment executed (end-effector
delta xyz + gripper, +1 closes; the registry maps it to the standard 7-D action), `language_instruction`
(the task's template), `reward`, `discount`, `success` (after the step's action), `is_first/is_last/is_terminal`.
Each episode also carries `episode_metadata` (task, MT1 seed and variant, success).

An episode runs until the expert succeeds or `--max_steps`; a last step holds the final observation with a
zero motion (is_terminal when it succeeded). Task `i`'s episode `j` runs on variant `j` of `MT1(task, seed)`:
evaluate on another seed to hold the variants out.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

from data_pipelines import make_lerobot, make_oxe_like

DATASET_NAME = "metaworld"
DATASET_VERSION = "0.1.0"
LEROBOT_NAME = "metaworld_lerobot"
LEROBOT_CAMERAS = ("observation.images.image", "observation.images.wrist_image")
METAWORLD_FPS = 80  # Meta-World's control rate (its published LeRobot datasets use it too)
WRIST_CAMERA = "gripperPOV"  # = wamjax.sim.metaworld_env.WRIST_CAMERA (not imported: it loads MuJoCo)


def _features(resolution: tuple[int, int]) -> tfds.features.FeaturesDict:
    image = tfds.features.Image(shape=(*resolution, 3), dtype=np.uint8, encoding_format="jpeg")
    scalar = lambda dtype: tfds.features.Scalar(dtype=dtype)
    return tfds.features.FeaturesDict(
        {
            "episode_metadata": {
                "task": tfds.features.Text(),
                "benchmark_seed": scalar(np.int64),
                "variant": scalar(np.int64),
                "success": np.bool_,
            },
            "steps": tfds.features.Dataset(
                {
                    "observation": {
                        "image": image,
                        "wrist_image": image,
                        "state": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                        "full_state": tfds.features.Tensor(shape=(39,), dtype=np.float32),
                    },
                    "action": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "language_instruction": tfds.features.Text(),
                    "reward": scalar(np.float32),
                    "discount": scalar(np.float32),
                    "success": np.bool_,
                    "is_first": np.bool_,
                    "is_last": np.bool_,
                    "is_terminal": np.bool_,
                }
            ),
        }
    )


_ENVS: dict[tuple[Any, ...], Any] = {}  # the simulating process's environments, one per task and image setting


def _simulate(job: tuple[str, int, int, tuple[int, int], str, int]) -> dict[str, Any]:
    from wamjax.sim import metaworld_env  # MuJoCo and Meta-World: loaded where episodes are simulated

    task, seed, variant, resolution, camera, max_steps = job
    key = (task, resolution, camera)
    if key not in _ENVS:
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
        _ENVS[key] = metaworld_env.MetaWorldTask(task, resolution=resolution, camera=camera, wrist_camera=WRIST_CAMERA)
    return expert_episode(_ENVS[key], seed, variant, max_steps)


def expert_episode(env: Any, seed: int, variant: int, max_steps: int) -> dict[str, Any]:
    """Runs the scripted expert on one variant of `env` (a MetaWorldTask); returns the RLDS episode."""
    from wamjax.sim import metaworld_env  # MuJoCo and Meta-World: loaded where episodes are simulated

    obs = env.reset(seed, variant)
    expert = env.expert()
    text = metaworld_env.instruction(env.task)
    steps: list[dict[str, Any]] = []

    def observation() -> dict[str, np.ndarray]:
        return {
            "image": env.render(),
            "wrist_image": env.render(WRIST_CAMERA),
            "state": env.proprio(),
            "full_state": np.asarray(obs, np.float32),
        }

    success = False
    gripper = np.float32(-1.0)
    for _ in range(max_steps):
        action = np.clip(np.asarray(expert.get_action(obs), np.float32), -1.0, 1.0)
        current = observation()
        result = env.step(action)
        obs, success, gripper = result.obs, result.success, action[3]
        steps.append({"observation": current, "action": action, "reward": np.float32(result.reward),
                      "success": success})
        if success or result.truncated:
            break
    # The final observation, with no motion and the gripper held, so the episode shows where it ended.
    steps.append({"observation": observation(), "action": np.array([0, 0, 0, gripper], np.float32),
                  "reward": np.float32(0.0), "success": success})
    for i, step in enumerate(steps):
        step.update(language_instruction=text, discount=np.float32(1.0), is_first=i == 0,
                    is_last=i == len(steps) - 1, is_terminal=success and i == len(steps) - 1)
    metadata = {"task": env.task, "benchmark_seed": seed, "variant": variant, "success": success}
    return {"episode_metadata": metadata, "steps": steps}


def collect_metaworld(
    out_dir: str,
    tasks: Sequence[str],
    episodes: int,
    *,
    seed: int = 0,
    resolution: tuple[int, int] = (128, 128),
    camera: str = "corner",
    max_steps: int = 500,
    data_format: str = "rlds",
) -> str:
    """Writes `episodes` expert episodes of each task to `out_dir/metaworld/<version>/` (RLDS), or with
    `data_format="lerobot"` as the LeRobot v3.0 dataset `out_dir/metaworld_lerobot/` (read as
    `lerobot:metaworld_lerobot`); returns that dir."""
    from wamjax.sim import metaworld_env  # MuJoCo and Meta-World: loaded where episodes are simulated

    metaworld_env.check_tasks(list(tasks))
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if not 1 <= max_steps <= metaworld_env.MAX_EPISODE_STEPS:
        raise ValueError(f"--max_steps must be in [1, {metaworld_env.MAX_EPISODE_STEPS}], got {max_steps}")
    resolution = (int(resolution[0]), int(resolution[1]))
    if data_format not in ("rlds", "lerobot"):
        raise ValueError(f"--format={data_format!r}; expected 'rlds' or 'lerobot'")
    tfds.disable_progress_bar()

    def generate() -> Iterator[tuple[str, dict[str, Any]]]:
        # MuJoCo's CPU renderer (Mesa llvmpipe) and TensorFlow, which TFDS writes with, crash when loaded in
        # one process: the episodes are simulated in a spawned process that never imports TensorFlow.
        jobs = [(task, seed, variant, resolution, camera, max_steps) for task in tasks for variant in range(episodes)]
        successes: dict[str, int] = dict.fromkeys(tasks, 0)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            for (task, _, variant, *_), episode in zip(jobs, pool.imap(_simulate, jobs), strict=True):
                successes[task] += episode["episode_metadata"]["success"]
                logging.info("%s variant %d: %d steps, success=%s", task, variant,
                             len(episode["steps"]), episode["episode_metadata"]["success"])
                yield f"{task}/{seed}/{variant}", episode
        for task in tasks:
            print(f"{task}: {successes[task]}/{episodes} expert episodes succeeded", flush=True)

    if data_format == "lerobot":
        return _write_lerobot(out_dir, generate(), tasks, episodes)
    features = _features(resolution)

    builder = make_oxe_like.generated_builder(
        DATASET_NAME, out_dir, features, generate, DATASET_VERSION,
        description=f"Meta-World expert episodes of {', '.join(tasks)}",
        release_notes="Meta-World scripted-expert episodes.",
    )
    if os.path.exists(builder.data_dir):
        raise FileExistsError(f"{builder.data_dir} already exists; remove it or choose another --out")
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(verify_ssl=False)
    )
    logging.info("Wrote %d episodes per task of %s to %s", episodes, list(tasks), builder.data_dir)
    return builder.data_dir


def _write_lerobot(out_dir: str, episodes_iter: Iterator[tuple[str, dict[str, Any]]], tasks: Sequence[str],
                   episodes: int) -> str:
    """The simulated episodes as a LeRobot dataset (robot_type metaworld: its 4-D action as recorded)."""
    root = os.path.join(out_dir, LEROBOT_NAME)
    if os.path.exists(root):
        raise FileExistsError(f"{root} already exists; remove it or choose another --out")
    converted = []
    for _, episode in episodes_iter:
        steps = episode["steps"]
        converted.append({
            "images": {LEROBOT_CAMERAS[0]: np.stack([s["observation"]["image"] for s in steps]),
                       LEROBOT_CAMERAS[1]: np.stack([s["observation"]["wrist_image"] for s in steps])},
            "state": np.stack([s["observation"]["state"] for s in steps]).astype(np.float32),
            "action": np.stack([s["action"] for s in steps]).astype(np.float32),
            "task": str(steps[0]["language_instruction"]),
        })
    make_lerobot.write_dataset(root, converted, fps=METAWORLD_FPS, robot_type="metaworld", codec="h264",
                               action_names=("delta_x", "delta_y", "delta_z", "gripper"))
    logging.info("Wrote %d episodes per task of %s to %s", episodes, list(tasks), root)
    return root


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    if len(FLAGS.resolution) != 2:
        raise app.UsageError(f"--resolution is H,W; got {FLAGS.resolution}")
    path = collect_metaworld(
        os.path.expanduser(FLAGS.out),
        FLAGS.tasks,
        FLAGS.episodes,
        seed=FLAGS.seed,
        resolution=tuple(int(v) for v in FLAGS.resolution),
        camera=FLAGS.camera,
        max_steps=FLAGS.max_steps,
        data_format=FLAGS.format,
    )
    print(f"Wrote {FLAGS.episodes} episodes of each of {', '.join(FLAGS.tasks)} to {path}")


if __name__ == "__main__":
    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_enum("env", "metaworld", ["metaworld"], "Simulator.")
    flags.DEFINE_list("tasks", ["reach-v3"], "Meta-World tasks (e.g. reach-v3,push-v3).")
    flags.DEFINE_integer("episodes", 10, "Expert episodes per task.")
    flags.DEFINE_string("out", None, "Directory to write the TFDS dataset under (DIR/metaworld/<version>/).")
    flags.DEFINE_list("resolution", ["128", "128"], "H,W of the rendered cameras.")
    flags.DEFINE_string("camera", "corner", "Primary camera (corner, corner2, corner3, corner4, topview, ...).")
    flags.DEFINE_integer("seed", 0, "MT1 seed whose task variants the episodes run on.")
    flags.DEFINE_integer("max_steps", 500, "Steps before an unsuccessful episode is cut.")
    flags.DEFINE_enum("format", "rlds", ["rlds", "lerobot"], "Dataset format: TFDS/RLDS or a LeRobot v3.0 folder.")
    app.run(main)
