"""The procedural scene the local dataset writers render (OXE-like RLDS and LeRobot): an end effector moving
over a textured table by the episode's actions, so a model can learn how actions change frames."""

from __future__ import annotations

import dataclasses

import numpy as np

# Instruction -> direction of motion in the image plane (x right, y down) and whether the gripper
# closes half-way; motion depends on the instruction so conditioning carries signal.
TASKS: dict[str, tuple[tuple[float, float], bool]] = {
    "move the gripper to the left": ((-1.0, 0.0), False),
    "move the gripper to the right": ((1.0, 0.0), False),
    "push the block forward": ((0.0, -1.0), False),
    "pull the block back": ((0.0, 1.0), False),
    "pick up the red cube": ((0.6, 0.6), True),
    "place the cube on the left": ((-0.6, 0.6), True),
}


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One generated episode in the canonical form every dataset maker converts from."""

    instruction: str
    eef_delta: np.ndarray  # [L, 6] xyz + rpy deltas
    gripper_open: np.ndarray  # [L] in {0, 1}, 1 = open
    eef_pose: np.ndarray  # [L, 6] integrated pose at each step (before the step's action)
    scene_seed: int


def make_trajectory(rng: np.random.Generator, length: int) -> Trajectory:
    """One episode of `length` steps: a random task's motion with smooth noise, and its scene."""
    instruction = str(rng.choice(list(TASKS)))
    (dx, dy), closes = TASKS[instruction]
    noise = rng.normal(0.0, 0.01, size=(length, 6))
    smooth = np.cumsum(noise, axis=0) * 0.3
    eef_delta = np.zeros((length, 6), np.float32)
    # Cover ~0.4 of the image over the episode, starting on the far side, so the effector stays in view.
    speed = 0.4 / length
    eef_delta[:, 0] = speed * dx + smooth[:, 0] * 0.3
    eef_delta[:, 1] = speed * dy + smooth[:, 1] * 0.3
    eef_delta[:, 2] = 0.01 * np.sin(np.linspace(0, np.pi, length)) + smooth[:, 2] * 0.3
    eef_delta[:, 3:5] = smooth[:, 3:5] * 0.2
    eef_delta[:, 5] = 0.05 * rng.choice([-1.0, 1.0]) + smooth[:, 5]
    gripper_open = np.ones(length, np.float32)
    if closes:
        gripper_open[length // 2 :] = 0.0
    start = np.array(
        [0.5 - 0.2 * dx + rng.uniform(-0.1, 0.1), 0.5 - 0.2 * dy + rng.uniform(-0.1, 0.1), 0.5, 0.0, 0.0, 0.0],
        np.float32,
    )
    eef_pose = start + np.concatenate([np.zeros((1, 6), np.float32), np.cumsum(eef_delta, 0)[:-1]], 0)
    return Trajectory(instruction, eef_delta, gripper_open, eef_pose.astype(np.float32), int(rng.integers(2**31)))


def render_frame(
    pose: np.ndarray, gripper_open: float, scene_seed: int, size: tuple[int, int], wrist: bool = False
) -> np.ndarray:
    """Renders one uint8 [H, W, 3] frame of the procedural scene at an end-effector `pose`."""
    height, width = size
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    scene = np.random.default_rng(scene_seed)
    tint = scene.uniform(0.2, 0.8, size=3)
    checker = ((np.floor(xx * 8) + np.floor(yy * 6)) % 2) * 0.1
    image = np.stack([tint[c] * (0.7 + 0.3 * yy) + checker for c in range(3)], axis=-1)
    cx, cy = float(np.clip(pose[0], 0, 1)), float(np.clip(pose[1], 0, 1))
    if wrist:
        # The wrist camera moves with the effector: the scene shifts the opposite way.
        xx, yy = xx + cx - 0.5, yy + cy - 0.5
        cx, cy = 0.5, 0.5
    block = (np.abs(xx - 0.5) < 0.08) & (np.abs(yy - 0.7) < 0.06)
    image[block] = [0.8, 0.1, 0.1]
    radius = 0.05 + 0.05 * float(np.clip(pose[2], 0, 1))
    blob = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
    image[blob] = [0.1, 0.8, 0.2] if gripper_open > 0.5 else [0.1, 0.2, 0.9]
    yaw = float(pose[5])
    along = (xx - cx) * np.cos(yaw) + (yy - cy) * np.sin(yaw)
    across = -(xx - cx) * np.sin(yaw) + (yy - cy) * np.cos(yaw)
    bar = (np.abs(across) < 0.012) & (along > 0) & (along < radius * 1.8)
    image[bar] = [1.0, 1.0, 0.2]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)
