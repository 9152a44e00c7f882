"""A Meta-World task simulated and rendered in a spawned process, for callers that have TensorFlow loaded."""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any

import numpy as np

from wamjax.sim import metaworld_env


def _serve_task(conn: Any, task: str, resolution: tuple[int, int], camera: str) -> None:
    """The child side of `SpawnedTask`: one MetaWorldTask, driven by (method, args) messages."""
    try:
        env = metaworld_env.MetaWorldTask(task, resolution=resolution, camera=camera)
    except Exception:  # noqa: BLE001 - the parent re-raises it with the child's traceback
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    with env:
        while True:
            name, args = conn.recv()
            if name == "close":
                conn.send(("ok", None))
                return
            try:
                if name == "expert_action":
                    value = np.asarray(env.expert().get_action(*args), np.float32)  # the experts are stateless
                else:
                    value = getattr(env, name)(*args)
            except Exception:  # noqa: BLE001 - as above
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("ok", value))


class SpawnedTask:
    """A `metaworld_env.MetaWorldTask` simulated and rendered in a spawned process, with the same methods.

    MuJoCo's CPU renderer crashes in a process that has TensorFlow loaded (as a trainer reading TFDS data
    has), so the training loop's closed-loop evaluation keeps the simulator in a child that never imports it.
    """

    def __init__(self, task: str, *, resolution: tuple[int, int] = (128, 128),
                 camera: str = metaworld_env.DEFAULT_CAMERA):
        metaworld_env.check_tasks([task])
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_task, args=(child, task, tuple(resolution), camera),
                                        daemon=True)
        self._process.start()
        child.close()
        self.task, self.obs = task, None
        self._receive("start")

    def _receive(self, name: str) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the Meta-World process of {self.task} exited with {self._process.exitcode} "
                               f"during {name}") from None
        if status == "error":
            raise RuntimeError(f"the Meta-World process of {self.task} failed in {name}:\n{value}")
        return value

    def _call(self, name: str, *args: Any) -> Any:
        self._conn.send((name, args))
        return self._receive(name)

    def reset(self, seed: int, index: int) -> np.ndarray:
        self.obs = self._call("reset", seed, index)
        return self.obs

    def step(self, action: np.ndarray) -> metaworld_env.StepResult:
        result = self._call("step", np.asarray(action))
        self.obs = result.obs
        return result

    def render(self, camera: str | None = None) -> np.ndarray:
        return self._call("render", camera)

    def proprio(self) -> np.ndarray:
        return np.asarray(self.obs[: metaworld_env.PROPRIO_DIM], np.float32)

    def expert(self) -> Any:
        """The task's scripted expert, asked in the child (`get_action(obs)` -> 4-D action)."""
        return _SpawnedExpert(self)

    def close(self) -> None:
        if self._process.is_alive():
            self._call("close")
        self._process.join(timeout=30)
        self._conn.close()

    def __enter__(self) -> SpawnedTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SpawnedExpert:
    def __init__(self, env: SpawnedTask):
        self.env = env

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        return self.env._call("expert_action", obs)
