"""Meta-World tasks as camera-observed environments: rendering, task variants, scripted experts, instructions.

One `MetaWorldTask` holds one task's MuJoCo environment and an offscreen renderer sized to the image
(multisampling and shadows off: the default `env.render()` is ~20x slower). Episodes run on the variants of
`metaworld.MT1(task, seed)` (50 goal/object placements per seed), so collection and evaluation pick disjoint
variants by seed. Meta-World has no language: each task gets an instruction from a template.

Rendering on a CPU goes through EGL on Mesa's software rasterizer (`MUJOCO_GL=egl`, the default set here);
`MUJOCO_GL=osmesa` works too where libosmesa6 is installed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from typing import Any

import numpy as np

# MuJoCo picks its GL backend when imported; without a display only EGL or OSMesa can render.
os.environ.setdefault("MUJOCO_GL", "egl")

import metaworld  # noqa: E402
import mujoco  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from data_pipelines.standardize.registry import metaworld_action_from_standard  # noqa: E402

VARIANTS_PER_SEED = 50  # MT1 draws this many task variants per seed
MAX_EPISODE_STEPS = 500  # Meta-World's own cap (max_path_length)
PROPRIO_DIM = 4  # obs[0:4]: end-effector xyz and gripper opening
DEFAULT_CAMERA = "corner"

# One instruction per task, in the imperative of the OXE datasets' instructions.
INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "reach the red goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "door-open-v3": "open the door",
}


def known_tasks() -> list[str]:
    """Every Meta-World task name that has a scripted expert (e.g. `reach-v3`)."""
    return sorted(set(metaworld.MT1.ENV_NAMES) & set(ENV_POLICY_MAP))


def check_tasks(tasks: list[str]) -> list[str]:
    """Returns `tasks`, or raises naming the unknown ones and the known ones."""
    if not tasks:
        raise ValueError("no Meta-World task given; e.g. --tasks=reach-v3,push-v3")
    unknown = [t for t in tasks if t not in known_tasks()]
    if unknown:
        raise ValueError(f"unknown Meta-World task(s) {unknown}; known: {known_tasks()}")
    return tasks


def instruction(task: str) -> str:
    """The language instruction of `task` (a template: Meta-World itself has none)."""
    if task in INSTRUCTIONS:
        return INSTRUCTIONS[task]
    return task.removesuffix("-v3").replace("-", " ")


@dataclasses.dataclass
class StepResult:
    """What one environment step returned."""

    obs: np.ndarray  # float [39]
    reward: float
    success: bool
    truncated: bool


WRIST_CAMERA = "gripperPOV"  # the gripper camera collect_sim records as observation/wrist_image
# A policy's camera (a role or an observation key of the `metaworld` dataset) -> the scene camera to render;
# None is the episode's primary camera (`--camera`).
_CAMERA_OF_ROLE = {"primary": None, "image": None, "wrist": WRIST_CAMERA, "wrist_image": WRIST_CAMERA}


def camera_of_role(camera: str) -> str | None:
    """The Meta-World scene camera of a policy's camera name (None: the primary camera the episode renders)."""
    if camera not in _CAMERA_OF_ROLE:
        raise ValueError(f"camera {camera!r} has no Meta-World camera; known: {sorted(_CAMERA_OF_ROLE)}")
    return _CAMERA_OF_ROLE[camera]


class MetaWorldTask:
    """One Meta-World task: reset to a variant, step 4-D actions, render the camera(s) the right way up."""

    def __init__(
        self,
        task: str,
        *,
        resolution: tuple[int, int] = (128, 128),
        camera: str = DEFAULT_CAMERA,
        wrist_camera: str | None = None,
    ):
        check_tasks([task])
        if "tensorflow" in sys.modules:
            # Seen with Mesa 22 llvmpipe and tensorflow-cpu 2.21: the two LLVM copies crash the process.
            raise RuntimeError(
                "TensorFlow is loaded in this process, and MuJoCo's CPU renderer (Mesa llvmpipe) crashes beside "
                "it: render in a process that never imports TensorFlow (wamjax.jobs.collect_sim simulates "
                "in a spawned one)"
            )
        self.task = task
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.env = _task_class(task)()
        self._benchmarks: dict[int, Any] = {}
        model = self.env.model
        cameras = [model.camera(i).name for i in range(model.ncam)]
        for name in (camera, wrist_camera):
            if name is not None and name not in cameras:
                raise ValueError(f"camera {name!r} is not in Meta-World's scene; known: {cameras}")
        self.camera, self.wrist_camera = camera, wrist_camera
        height, width = self.resolution
        if height > model.vis.global_.offheight or width > model.vis.global_.offwidth:
            model.vis.global_.offheight = max(height, model.vis.global_.offheight)
            model.vis.global_.offwidth = max(width, model.vis.global_.offwidth)
        model.vis.quality.offsamples = 0
        self._renderer = mujoco.Renderer(model, height, width)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self.obs: np.ndarray | None = None

    def variant(self, seed: int, index: int) -> Any:
        """Task variant `index` of seed `seed`; index >= 50 moves on to the following seeds' variants."""
        seed = seed + index // VARIANTS_PER_SEED
        if seed not in self._benchmarks:
            self._benchmarks[seed] = metaworld.MT1(self.task, seed=seed).train_tasks
        return self._benchmarks[seed][index % VARIANTS_PER_SEED]

    def reset(self, seed: int, index: int) -> np.ndarray:
        """Starts an episode on variant `index` of seed `seed`; returns the observation [39]."""
        self.env.set_task(self.variant(seed, index))
        obs, _ = self.env.reset()
        self.obs = np.asarray(obs, np.float64)
        return self.obs

    def step(self, action: np.ndarray) -> StepResult:
        """Executes one 4-D action (clipped to [-1, 1]: end-effector delta xyz, gripper +1 closes)."""
        action = np.asarray(action, np.float64)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(f"Meta-World action must be 4 finite values; got {action!r}")
        obs, reward, _, truncated, info = self.env.step(np.clip(action, -1.0, 1.0))
        self.obs = np.asarray(obs, np.float64)
        return StepResult(self.obs, float(reward), bool(info["success"]), bool(truncated))

    def proprio(self) -> np.ndarray:
        """float32 [4]: end-effector xyz and gripper opening in [0, 1]."""
        return np.asarray(self.obs[:PROPRIO_DIM], np.float32)

    def render(self, camera: str | None = None) -> np.ndarray:
        """uint8 [H, W, 3] of `camera` (default: the primary camera) the right way up."""
        camera = camera or self.camera
        self._renderer.update_scene(self.env.data, camera=camera)
        image = self._renderer.render()
        if camera.startswith("corner"):
            # The corner cameras' up axis points down in the scene file: the image is rotated 180 degrees.
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def expert(self) -> Any:
        """A fresh scripted expert of this task (`get_action(obs)` -> 4-D action)."""
        # The experts' gains saturate the action range on purpose (the step clips); their warning says so.
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high", category=UserWarning)
        return ENV_POLICY_MAP[self.task]()

    def close(self) -> None:
        """Frees the GL context (at interpreter exit the EGL teardown order is not guaranteed)."""
        self._renderer.close()
        self.env.close()

    def __enter__(self) -> MetaWorldTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _task_class(task: str) -> type:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return ALL_V3_ENVIRONMENTS[task]


def env_action(standard_action: np.ndarray) -> np.ndarray:
    """A 7-D standardized action (EEF delta xyz, rpy, gripper open in [0, 1]) -> Meta-World's 4-D action."""
    return metaworld_action_from_standard(standard_action)
