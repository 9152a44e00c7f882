"""Closed-loop evaluation of a policy in Meta-World: act a chunk, observe, replan; success rate per task.

    python -m wamjax.eval.closed_loop --checkpoint=WORKDIR/checkpoints --env=metaworld --tasks=reach-v3 \
        --episodes=10 --out=DIR [--max_steps=200] [--seed=1000]
    python -m wamjax.eval.closed_loop --policy=expert --tasks=reach-v3 --episodes=10   # baselines: expert | random
                                                                                       # | replay (blind)

Episodes run on the variants of `MT1(task, seed)` for `--seed` (default 1000; `collect_sim` collects on seed
0, so these are held out). A checkpoint acts through `wamjax.inference.Policy` with its dataset's
normalization stats: each predicted action is held for `data.frame_stride` environment steps (the clip's
frames are that far apart) and mapped from the standard 7-D action back to Meta-World's 4-D one. Chunk-causal
checkpoints roll out over the KV cache (`start_rollout` / `next_actions` / `observe`), others call `infer`
on the newest frame. With `--out`, writes `DIR/summary.json` and one mp4 per episode under `DIR/videos/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from absl import app, flags, logging

from wamjax.sim import metaworld_env

DEFAULT_EVAL_SEED = 1000  # collection uses seed 0: evaluation variants differ


class Agent(Protocol):
    """What the loop drives: a chunk of 4-D actions per call, then the frames seen while it ran."""

    name: str

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None: ...

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray: ...

    def observe(self, frames: list[np.ndarray]) -> None: ...


class ExpertAgent:
    """Meta-World's scripted expert (one action per call, from the full state)."""

    name = "expert"

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None:
        self.expert = env.expert()

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(self.expert.get_action(env.obs), np.float32), -1, 1)[None]

    def observe(self, frames: list[np.ndarray]) -> None:
        pass


class RandomAgent:
    """Uniform random actions in [-1, 1]^4."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None:
        pass

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, (1, 4)).astype(np.float32)

    def observe(self, frames: list[np.ndarray]) -> None:
        pass


class ReplayAgent:
    """Blind baseline: the scripted expert's actions on one collection episode (variant `variant` of MT1 seed
    `seed`), replayed open loop on every episode, then zero motion. Succeeds where the task barely varies."""

    name = "replay"

    def __init__(self, seed: int = 0, variant: int = 0):
        self.seed, self.variant = seed, variant
        self.recorded: dict[str, np.ndarray] = {}

    def _record(self, env: Any) -> np.ndarray:
        # A second environment of the same kind, so the evaluation's episode is left as it is.
        with type(env)(env.task, resolution=(16, 16)) as recorder:
            recorder.reset(self.seed, self.variant)
            expert, actions = recorder.expert(), []
            for _ in range(metaworld_env.MAX_EPISODE_STEPS):
                actions.append(np.clip(np.asarray(expert.get_action(recorder.obs), np.float32), -1, 1))
                if recorder.step(actions[-1]).success:
                    break
        return np.stack(actions)

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None:
        if env.task not in self.recorded:
            self.recorded[env.task] = self._record(env)
        self.actions, self.index = self.recorded[env.task], 0

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray:
        self.index += 1
        if self.index > len(self.actions):
            return np.zeros((1, 4), np.float32)
        return self.actions[self.index - 1][None]

    def observe(self, frames: list[np.ndarray]) -> None:
        pass


VISION_ABLATIONS = ("none", "blank")


class PolicyAgent:
    """A world-action model checkpoint acting chunk by chunk through `wamjax.inference.Policy`.

    `rollout`: "infer" (a fresh prediction from the newest frame each chunk) or "kv_cache" (chunk-causal
    models: the real frames of each executed chunk go into the KV cache). `execute` caps how many of a
    chunk's actions run before replanning (None: all).
    """

    name = "policy"

    def __init__(self, policy: Any, *, rollout: str = "auto", execute: int | None = None,
                 vision_ablation: str = "none", control_hz: float | None = None):
        """`vision_ablation="blank"` feeds the policy a black frame in place of every camera (does it look?);
        `control_hz` (environment steps per second of a simulated robot) reports the time it idles."""
        self.control_hz = control_hz
        if vision_ablation not in VISION_ABLATIONS:
            raise ValueError(f"--vision_ablation={vision_ablation!r}; expected one of {VISION_ABLATIONS}")
        self.policy = policy
        self.vision_ablation = vision_ablation
        self.cameras = [metaworld_env.camera_of_role(c) for c in policy.camera_names]
        layout = str(policy.model_config.attention_layout)
        if rollout == "auto":
            rollout = "kv_cache" if layout == "chunk_causal" else "infer"
        if rollout not in ("infer", "kv_cache"):
            raise ValueError(f"--rollout={rollout!r}; expected auto, infer or kv_cache")
        if rollout == "kv_cache" and layout != "chunk_causal":
            raise ValueError(f"--rollout=kv_cache needs a chunk_causal checkpoint; this one is {layout!r}")
        if rollout == "kv_cache" and execute is not None:
            raise ValueError("--execute_actions applies to --rollout=infer; the KV cache executes whole chunks")
        if execute is not None and execute < 1:
            raise ValueError(f"--execute_actions must be >= 1, got {execute}")
        self.rollout, self.execute = rollout, execute
        self.frame_stride = int(policy.spec.data.frame_stride)
        self.session: Any = None

    def images(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """What the policy sees: `frame` (the primary camera) and the policy's other cameras rendered now."""
        if len(self.cameras) == 1:
            images = [frame]
        else:
            images = [frame if camera is None else env.render(camera) for camera in self.cameras]
        if self.vision_ablation == "blank":
            images = [np.zeros_like(image) for image in images]
        return images[0] if len(images) == 1 else images

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None:
        self.instruction = instruction
        self.session = None
        self.idle_seconds = 0.0  # inference time: a synchronous robot waits through all of it
        if self.rollout == "kv_cache":
            self.session = self.policy.start_rollout(self.images(env, frame), env.proprio(), instruction)

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray:
        if self.session is not None:
            start = time.perf_counter()
            actions = self.session.next_actions()
        else:
            images = self.images(env, frame)
            start = time.perf_counter()
            actions = self.policy.infer(images, env.proprio(), self.instruction)["actions"][: self.execute]
        self.idle_seconds += time.perf_counter() - start
        # One predicted action spans `frame_stride` environment steps: the clip's frames are that far apart.
        return metaworld_env.env_action(np.repeat(actions, self.frame_stride, axis=0))

    def observe(self, frames: list[np.ndarray]) -> None:
        if self.session is None:
            return
        boundaries = frames[self.frame_stride - 1 :: self.frame_stride]
        if len(boundaries) == self.session.frames_per_observation:
            self.session.observe(np.stack(boundaries))


class AsyncPolicyAgent(PolicyAgent):
    """Real-time chunking on a simulated robot that executes one environment step every 1 / `control_hz` s.

    While chunk k executes, chunk k+1 is computed from the newest observation: inference starts when the actions
    of chunk k left to run would last as long as the last inference took, and those actions are held fixed as
    chunk k+1's clean prefix (`Policy.infer(action_prefix=...)`), so the robot goes on without a seam. The
    simulation runs one thing at a time, so each act() returns the actions that run during the inference
    (the prefix) followed by chunk k+1's own, up to where the next inference starts. `idle_seconds` counts the
    time the robot waits for actions: the first chunk's inference, and any inference that outlasts its prefix.
    A synchronous agent idles for every inference.
    """

    name = "policy (async)"

    def __init__(self, policy: Any, *, control_hz: float, vision_ablation: str = "none"):
        super().__init__(policy, rollout="infer", vision_ablation=vision_ablation)
        if control_hz <= 0:
            raise ValueError(f"--control_hz={control_hz}; expected > 0 (environment steps per second)")
        self.control_hz = float(control_hz)
        self.chunk = int(policy.num_actions)
        if self.chunk < 2:
            raise ValueError(f"the policy's chunks hold {self.chunk} action; asynchronous execution needs >= 2")
        self.compiled = False

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None:
        super().reset(env, instruction, frame)
        if not self.compiled:  # one compiled call per prefix length, before any latency counts
            dim = self.policy.model_config.action_dim
            for k in range(self.chunk):
                self.policy.infer(self.images(env, frame), env.proprio(), instruction,
                                  action_prefix=np.zeros((k, dim), np.float32) if k else None)
            self.compiled = True
        self.pending: np.ndarray | None = None  # the policy actions that run during the next inference
        self.last_latency_s = 0.0
        self.idle_seconds = 0.0

    def _delay_actions(self) -> int:
        """Policy actions that run during an inference as long as the last one (at least 1, leaving at least one
        of the chunk's own)."""
        steps = self.last_latency_s * self.control_hz / self.frame_stride
        return int(min(max(1, np.ceil(steps)), self.chunk - 1))

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray:
        images = self.images(env, frame)
        start = time.perf_counter()
        prefix = self.pending
        actions = self.policy.infer(images, env.proprio(), self.instruction, action_prefix=prefix)["actions"]
        latency = time.perf_counter() - start
        covered = 0.0 if prefix is None else len(prefix) * self.frame_stride / self.control_hz
        self.idle_seconds += max(0.0, latency - covered)
        self.last_latency_s = latency
        done = 0 if prefix is None else len(prefix)  # the prefix runs during this inference
        delay = self._delay_actions()
        end = max(done + 1, self.chunk - delay)
        self.pending = actions[end:] if end < self.chunk else None
        if self.pending is not None and len(self.pending) == 0:
            self.pending = None
        return metaworld_env.env_action(np.repeat(actions[:end], self.frame_stride, axis=0))


# Runs in a Python that has openpi-client (its own venv: it pins numpy<2) and relays length-prefixed
# msgpack-numpy observations from stdin to the server and the replies back, so the loop talks to the server
# through the real client.
_OPENPI_BRIDGE = """
import struct, sys
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
client = WebsocketClientPolicy(host=sys.argv[1], port=int(sys.argv[2]))
source, sink = sys.stdin.buffer, sys.stdout.buffer
while header := source.read(4):
    observation = msgpack_numpy.unpackb(source.read(struct.unpack("<I", header)[0]))
    reply = msgpack_numpy.packb(client.infer(observation))
    sink.write(struct.pack("<I", len(reply)) + reply)
    sink.flush()
"""


class OpenpiBridge:
    """openpi-client's `WebsocketClientPolicy`, run by `python` (a venv with openpi-client), as `infer(obs)`."""

    def __init__(self, python: str, host: str, port: int):
        self.process = subprocess.Popen([python, "-c", _OPENPI_BRIDGE, host, str(port)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        from wamjax.serving.client import packb, unpackb

        message = packb(observation)
        self.process.stdin.write(struct.pack("<I", len(message)) + message)
        self.process.stdin.flush()
        header = self.process.stdout.read(4)
        if len(header) < 4:
            raise RuntimeError(f"the openpi-client bridge exited with {self.process.wait()}; see its stderr above")
        return unpackb(self.process.stdout.read(struct.unpack("<I", header)[0]))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


class ServerAgent:
    """The same loop through a running policy server: each chunk is one openpi-protocol request."""

    name = "wam (server)"

    def __init__(self, client: Any, frame_stride: int):
        self.client, self.frame_stride = client, frame_stride

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None:
        self.instruction = instruction

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray:
        reply = self.client.infer({"observation/image": frame, "observation/state": env.proprio(),
                                   "prompt": self.instruction})
        actions = np.asarray(reply["actions"], np.float32)
        return metaworld_env.env_action(np.repeat(actions, self.frame_stride, axis=0))

    def observe(self, frames: list[np.ndarray]) -> None:
        pass


@contextlib.contextmanager
def policy_server(checkpoint: str, *, dataset: str | None, num_steps: int, openpi_python: str | None,
                  timeout_s: float = 600.0) -> Iterator[ServerAgent]:
    """Starts `python -m wamjax.serving.serve` on a free local port and yields a `ServerAgent` talking to it."""
    import urllib.request

    from wamjax.checkpoint import manager as ckpt
    from wamjax.checkpoint.load import resolve_step_dir
    from wamjax.serving.client import PolicyClient

    frame_stride = int(ckpt.read_json_item(resolve_step_dir(checkpoint), "config")["data"]["frame_stride"])
    served = stats_dataset(checkpoint, dataset)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "wamjax.serving.serve", f"--checkpoint={checkpoint}", f"--port={port}",
               f"--num_steps={num_steps}", *([f"--dataset={served}"] if served else [])]
    server = subprocess.Popen(command)
    client: Any = None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the policy server exited with {server.returncode}: {' '.join(command)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the policy server on port {port} was not up after {timeout_s:.0f} s") from None
                time.sleep(1.0)
        client = OpenpiBridge(openpi_python, "127.0.0.1", port) if openpi_python else PolicyClient("127.0.0.1", port)
        agent = ServerAgent(client, frame_stride)
        if openpi_python:
            agent.name = "wam (server, openpi-client)"
        yield agent
    finally:
        if client is not None:
            client.close()
        server.terminate()
        server.wait(timeout=60)


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


@dataclasses.dataclass
class EpisodeResult:
    """One closed-loop episode."""

    task: str
    seed: int
    variant: int
    success: bool
    steps: int  # environment steps executed
    steps_to_success: int | None
    episode_return: float
    seconds: float
    video: str | None = None
    chunks: int = 0  # action chunks the agent produced
    actions: int = 0  # actions in them (environment steps they span)
    act_seconds: float = 0.0  # time spent in the agent's act(): inference, for a policy
    # A simulated robot stepping at the agent's control_hz: seconds it waited for actions, and moved.
    idle_seconds: float | None = None
    moving_seconds: float | None = None


def run_episode(
    agent: Agent, env: metaworld_env.MetaWorldTask, seed: int, variant: int, max_steps: int
) -> tuple[EpisodeResult, np.ndarray]:
    """Runs `agent` on one variant until success or `max_steps`; returns the result and the frames [T, H, W, 3]."""
    start = time.perf_counter()
    env.reset(seed, variant)
    frame = env.render()
    frames = [frame]
    agent.reset(env, metaworld_env.instruction(env.task), frame)
    steps, episode_return, success_step, done = 0, 0.0, None, False
    chunks, num_actions, act_seconds = 0, 0, 0.0
    while not done:
        act_start = time.perf_counter()
        chunk = np.asarray(agent.act(env, frame), np.float32)
        act_seconds += time.perf_counter() - act_start
        chunks += 1
        num_actions += len(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != 4 or len(chunk) == 0:
            raise ValueError(f"{agent.name} returned actions of shape {chunk.shape}; expected [k >= 1, 4]")
        seen = []
        for action in chunk:
            result = env.step(action)
            steps += 1
            episode_return += result.reward
            frame = env.render()
            frames.append(frame)
            seen.append(frame)
            if result.success:
                success_step = steps
            if result.success or result.truncated or steps >= max_steps:
                done = True
                break
        if not done:
            agent.observe(seen)
    result = EpisodeResult(
        task=env.task, seed=seed, variant=variant, success=success_step is not None, steps=steps,
        steps_to_success=success_step, episode_return=float(episode_return), seconds=time.perf_counter() - start,
        chunks=chunks, actions=num_actions, act_seconds=act_seconds,
    )
    control_hz = getattr(agent, "control_hz", None)
    if control_hz:  # an agent that does not count its idle time keeps the robot waiting through every act()
        result.idle_seconds = float(getattr(agent, "idle_seconds", act_seconds))
        result.moving_seconds = steps / float(control_hz)
    return result, np.stack(frames)


def control_frequency(rows: Sequence[EpisodeResult]) -> dict[str, float | None]:
    """chunks_per_s and actions_per_s: what the agent produced per second spent in its act() (None: no time)."""
    seconds = sum(r.act_seconds for r in rows)
    if seconds <= 0:
        return {"chunks_per_s": None, "actions_per_s": None}
    out = {"chunks_per_s": sum(r.chunks for r in rows) / seconds,
           "actions_per_s": sum(r.actions for r in rows) / seconds}
    if all(r.idle_seconds is not None for r in rows):
        idle = sum(r.idle_seconds for r in rows)
        out["idle_fraction"] = idle / max(idle + sum(r.moving_seconds for r in rows), 1e-12)
    return out


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Per-task and overall success rate, mean steps (to success, and overall) and mean return."""

    def block(rows: Sequence[EpisodeResult]) -> dict[str, Any]:
        successes = [r for r in rows if r.success]
        return {
            "episodes": len(rows),
            "successes": len(successes),
            "success_rate": len(successes) / len(rows),
            "mean_steps_to_success": float(np.mean([r.steps_to_success for r in successes])) if successes else None,
            "mean_steps": float(np.mean([r.steps for r in rows])),
            "mean_return": float(np.mean([r.episode_return for r in rows])),
            # Control frequency: chunks and (environment-step) actions the agent delivers per second it computes.
            **control_frequency(rows),
        }

    tasks = list(dict.fromkeys(r.task for r in results))
    summary = {task: block([r for r in results if r.task == task]) for task in tasks}
    for task in tasks:
        summary[task]["episode_results"] = [dataclasses.asdict(r) for r in results if r.task == task]
    return {"tasks": summary, "overall": block(results)}


def format_table(summary: dict[str, Any], policy_name: str) -> str:
    """The summary as a fixed-width table, one row per task and an overall row."""
    header = ("task", "policy", "episodes", "success rate", "steps to success", "mean steps", "mean return",
              "chunks/s", "actions/s", "idle")
    rows = []
    for task, entry in [*summary["tasks"].items(), ("overall", summary["overall"])]:
        to_success = entry["mean_steps_to_success"]
        rate = lambda key: "-" if entry.get(key) is None else f"{entry[key]:.1f}"  # noqa: B023
        rows.append((
            task, policy_name, str(entry["episodes"]),
            f"{entry['successes']}/{entry['episodes']} ({entry['success_rate']:.0%})",
            "-" if to_success is None else f"{to_success:.1f}", f"{entry['mean_steps']:.1f}",
            f"{entry['mean_return']:.1f}", rate("chunks_per_s"), rate("actions_per_s"),
            "-" if entry.get("idle_fraction") is None else f"{entry['idle_fraction']:.0%}",
        ))
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def evaluate(
    agent: Agent,
    tasks: Sequence[str],
    episodes: int,
    *,
    seed: int = DEFAULT_EVAL_SEED,
    max_steps: int = metaworld_env.MAX_EPISODE_STEPS,
    resolution: tuple[int, int] = (128, 128),
    camera: str = metaworld_env.DEFAULT_CAMERA,
    out_dir: str | None = None,
    video_fps: int = 30,
    log: Any = print,
    make_env: Callable[..., Any] = metaworld_env.MetaWorldTask,
) -> dict[str, Any]:
    """Runs `episodes` episodes of each task; returns the summary (and writes it, and videos, to `out_dir`).

    `make_env(task, resolution=, camera=)` builds each task's environment: `SpawnedTask` simulates in a child
    process (for callers that have TensorFlow loaded)."""
    from data_pipelines.make_videos import write_video

    metaworld_env.check_tasks(list(tasks))
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if not 1 <= max_steps <= metaworld_env.MAX_EPISODE_STEPS:
        raise ValueError(f"--max_steps must be in [1, {metaworld_env.MAX_EPISODE_STEPS}], got {max_steps}")
    if out_dir:
        os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    results = []
    for task in tasks:
        with make_env(task, resolution=resolution, camera=camera) as env:
            for variant in range(episodes):
                result, frames = run_episode(agent, env, seed, variant, max_steps)
                if out_dir:
                    result.video = os.path.join("videos", f"{task}_seed{seed}_variant{variant:03d}.mp4")
                    write_video(os.path.join(out_dir, result.video), frames, video_fps)
                results.append(result)
                outcome = f"success in {result.steps_to_success} steps" if result.success else "no success"
                log(f"{task} episode {variant + 1}/{episodes} (variant {variant} of seed {seed}): {outcome}, "
                    f"{result.steps} steps, return {result.episode_return:.1f}, {result.seconds:.1f} s")
    summary = summarize(results)
    summary["config"] = {"policy": agent.name, "seed": seed, "max_steps": max_steps,
                         "resolution": list(resolution), "camera": camera}
    if out_dir:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def stats_dataset(checkpoint: str, dataset: str | None) -> str | None:
    """`dataset` when the checkpoint has its normalization stats, None when its run's data was synthetic
    (a checkpoint of real data without stats is refused)."""
    from wamjax.checkpoint.load import load_model_run_config, load_norm_stats
    from wamjax.checkpoint.norm_stats import checked_norm_stats

    stats = checked_norm_stats(load_model_run_config(checkpoint), load_norm_stats(checkpoint),
                               where=f"checkpoint {checkpoint}")
    known = sorted(stats.get("datasets", {}))
    if not known:
        return None  # trained on synthetic data: actions are used as predicted
    if dataset not in known:
        raise KeyError(f"--dataset={dataset!r} has no normalization stats in {checkpoint}; it has {known}")
    return dataset


def load_policy_agent(
    checkpoint: str, *, dataset: str | None = "metaworld", rollout: str = "auto", execute: int | None = None,
    num_steps: int = 4, action_steps: int | None = None, cfg_scale: float = 1.0, seed: int = 0, mode: str = "joint",
    vision_ablation: str = "none", realtime: dict[str, Any] | None = None, execution: str = "sync",
    control_hz: float | None = None,
) -> PolicyAgent:
    """A `PolicyAgent` of a checkpoint, normalized with `dataset`'s stats when the checkpoint has stats;
    `realtime` holds `Policy.from_checkpoint`'s real-time knobs (video_stop_t, step_cache_mask, ...)."""
    from wamjax.inference.policy import Policy

    dataset = stats_dataset(checkpoint, dataset)
    policy = Policy.from_checkpoint(
        checkpoint, num_steps=num_steps, action_steps=action_steps, cfg_scale=cfg_scale, dataset=dataset, seed=seed,
        mode=mode, **(realtime or {}),
    )
    if execution == "async":
        if rollout not in ("auto", "infer") or execute is not None:
            raise ValueError("--execution=async runs full chunks through Policy.infer: drop --rollout=kv_cache and "
                             "--execute_actions")
        if control_hz is None:
            raise ValueError("--execution=async needs --control_hz (the simulated robot's steps per second)")
        agent = AsyncPolicyAgent(policy, control_hz=control_hz, vision_ablation=vision_ablation)
    elif execution == "sync":
        agent = PolicyAgent(policy, rollout=rollout, execute=execute, vision_ablation=vision_ablation,
                            control_hz=control_hz)
    else:
        raise ValueError(f"--execution={execution!r}; expected sync or async")
    agent.name = (f"wam ({mode}, {agent.rollout}{', async' if execution == 'async' else ''}"
                  f"{', blank camera' if vision_ablation == 'blank' else ''})")
    return agent


class LoopClosedLoop:
    """Closed-loop evaluation from the training loop: every `eval.closed_loop_every_steps` steps of a stage with
    actions and at its end, the current params act in the simulator (`SpawnedTask`); writes a `closed_loop`
    row (success rate, mean steps and return per task and overall) and videos under WORKDIR/closed_loop/."""

    def __init__(self, config: Any, stage: str, norm_stats: dict[str, Any] | None, writer: Any, workdir: str):
        ev = config.eval
        self.every = int(ev.closed_loop_every_steps)
        if ev.closed_loop_env != "metaworld":
            raise ValueError(f"eval.closed_loop_env={ev.closed_loop_env!r}; expected 'metaworld'")
        self.tasks = [t.strip() for t in str(ev.closed_loop_tasks).split(",") if t.strip()]
        try:
            metaworld_env.check_tasks(self.tasks)
        except ValueError as e:
            raise ValueError(f"eval.closed_loop_tasks={ev.closed_loop_tasks!r}: {e}") from None
        for key in ("closed_loop_episodes", "closed_loop_num_steps"):
            if int(ev[key]) < 1:
                raise ValueError(f"eval.{key}={ev[key]}; expected >= 1")
        if not 1 <= int(ev.closed_loop_max_steps) <= metaworld_env.MAX_EPISODE_STEPS:
            raise ValueError(f"eval.closed_loop_max_steps={ev.closed_loop_max_steps}; expected 1 to "
                             f"{metaworld_env.MAX_EPISODE_STEPS}")
        if len(tuple(ev.closed_loop_resolution)) != 2:
            raise ValueError(f"eval.closed_loop_resolution={ev.closed_loop_resolution}; expected (H, W)")
        from wamjax.checkpoint.norm_stats import checked_norm_stats

        norm_stats = checked_norm_stats(config, norm_stats, where=f"stage {stage!r} of this run")
        known = sorted(norm_stats.get("datasets", {}))
        if known and ev.closed_loop_dataset not in known:
            raise KeyError(f"eval.closed_loop_dataset={ev.closed_loop_dataset!r} has no normalization stats in "
                           f"this run; it has {known}")
        self.dataset = str(ev.closed_loop_dataset) if known else None  # synthetic data: actions as predicted
        self.config, self.stage, self.ev = config, stage, ev
        self.norm_stats, self.writer, self.workdir = norm_stats, writer, str(workdir)
        self.policy: Any = None

    @classmethod
    def maybe(cls, config: Any, stage: str, stage_mode: str, *args: Any) -> LoopClosedLoop | None:
        """An evaluator when `eval.closed_loop_every_steps` > 0 and the stage trains actions, else None."""
        import jax

        ev = config.get("eval")
        if ev is None or int(ev.get("closed_loop_every_steps", 0)) <= 0 or stage_mode != "joint":
            return None
        if jax.process_count() > 1:
            raise ValueError(f"eval.closed_loop_every_steps runs the simulator beside a single-process run; this "
                             f"run has {jax.process_count()} processes (evaluate its checkpoints with "
                             "python -m wamjax.eval.closed_loop instead)")
        return cls(config, stage, *args)

    def maybe_run(self, step: int, params: Any, stage_ends: bool, log: Any = logging.info) -> dict[str, Any] | None:
        """Evaluates when `step` is due (or the stage ends); returns the row written, if any."""
        if not (step % self.every == 0 or stage_ends):
            return None
        import jax
        import jax.numpy as jnp

        from wamjax.diffusion.sampler import SamplerOptions
        from wamjax.inference.policy import Policy

        ev, start = self.ev, time.perf_counter()
        params = jax.device_get(params)  # off the training mesh: the policy runs on one device
        if self.policy is None:
            options = SamplerOptions(num_steps=int(ev.closed_loop_num_steps),
                                     shift=float(self.config.diffusion.shift))
            self.policy = Policy(self.config, params, self.norm_stats, options=options, dataset=self.dataset)
        else:  # same shapes: the compiled policy step is reused
            self.policy.params = jax.tree.map(jnp.asarray, params)
        execute = int(ev.closed_loop_execute_actions) or None
        agent = PolicyAgent(self.policy, rollout="infer" if execute else "auto", execute=execute)
        agent.name = f"wam ({agent.rollout})"
        out = os.path.join(self.workdir, "closed_loop", f"step_{step}")
        summary = evaluate(
            agent, self.tasks, int(ev.closed_loop_episodes), seed=int(ev.closed_loop_seed),
            max_steps=int(ev.closed_loop_max_steps), resolution=tuple(int(v) for v in ev.closed_loop_resolution),
            camera=str(ev.closed_loop_camera), out_dir=out, log=log, make_env=SpawnedTask,
        )
        row: dict[str, Any] = {"event": "closed_loop", "kind": "closed_loop", "stage": self.stage, "step": int(step),
                               "out": out, "seconds": time.perf_counter() - start}
        for name, entry in [*summary["tasks"].items(), ("overall", summary["overall"])]:
            for key in ("success_rate", "mean_steps", "mean_return"):
                row[f"closed_loop/{name}/{key}"] = entry[key]
        self.writer.write_eval(row)
        log(f"closed-loop eval at step {step}:\n{format_table(summary, agent.name)}")
        return row


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if len(FLAGS.resolution) != 2:
        raise app.UsageError(f"--resolution is H,W; got {FLAGS.resolution}")
    log = lambda line: print(line, flush=True)
    run = lambda agent: evaluate(
        agent, FLAGS.tasks, FLAGS.episodes, seed=FLAGS.seed, max_steps=FLAGS.max_steps,
        resolution=tuple(int(v) for v in FLAGS.resolution), camera=FLAGS.camera, out_dir=FLAGS.out,
        video_fps=FLAGS.video_fps, log=log,
    )
    if FLAGS.policy != "checkpoint" and FLAGS.checkpoint:
        raise app.UsageError(f"--checkpoint was given with --policy={FLAGS.policy}; drop one of them")
    if FLAGS.policy == "checkpoint" and not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required with --policy=checkpoint (or pick --policy=expert|random)")
    if FLAGS.openpi_python and not FLAGS.through_server:
        raise app.UsageError("--openpi_python applies to --through_server")
    if FLAGS.through_server:
        if FLAGS.policy != "checkpoint":
            raise app.UsageError("--through_server serves a --checkpoint")
        with policy_server(FLAGS.checkpoint, dataset=FLAGS.dataset, num_steps=FLAGS.num_steps,
                           openpi_python=FLAGS.openpi_python) as agent:
            summary = run(agent)
    elif FLAGS.policy == "checkpoint":
        agent = load_policy_agent(
            FLAGS.checkpoint, dataset=FLAGS.dataset, rollout=FLAGS.rollout, execute=FLAGS.execute_actions,
            execution=FLAGS.execution, control_hz=FLAGS.control_hz,
            num_steps=FLAGS.num_steps, action_steps=FLAGS.action_steps, cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed,
            mode=FLAGS.mode, vision_ablation=FLAGS.vision_ablation,
            realtime={"video_stop_t": FLAGS.video_stop_t, "step_cache_threshold": FLAGS.step_cache_threshold,
                      "step_cache_mask": None if not FLAGS.step_cache_mask else
                      tuple(int(m) for m in FLAGS.step_cache_mask), "cfg_parallel": FLAGS.cfg_parallel},
        )
        summary = run(agent)
    else:
        agent = {"expert": ExpertAgent, "random": lambda: RandomAgent(FLAGS.seed), "replay": ReplayAgent}[
            FLAGS.policy]()
        summary = run(agent)
    print(format_table(summary, agent.name))
    if FLAGS.out:
        print(f"Wrote {os.path.join(FLAGS.out, 'summary.json')} and {summary['overall']['episodes']} videos")
    sys.stdout.flush()


if __name__ == "__main__":
    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_enum("env", "metaworld", ["metaworld"], "Simulator.")
    flags.DEFINE_enum("policy", "checkpoint", ["checkpoint", "expert", "random", "replay"], "What acts (replay: "
                      "the expert's actions of one collection episode, variant 0 of MT1 seed 0, open loop).")
    flags.DEFINE_string("checkpoint", None, "Checkpoint step directory, or a run's checkpoints/ (newest step).")
    flags.DEFINE_list("tasks", ["reach-v3"], "Meta-World tasks.")
    flags.DEFINE_integer("episodes", 10, "Episodes per task.")
    flags.DEFINE_integer("seed", DEFAULT_EVAL_SEED, "MT1 seed of the task variants (collection uses 0).")
    flags.DEFINE_integer("max_steps", metaworld_env.MAX_EPISODE_STEPS, "Environment steps before giving up.")
    flags.DEFINE_string("out", None, "Directory for summary.json and videos/ (none: print only).")
    flags.DEFINE_list("resolution", ["128", "128"], "H,W of the rendered camera (the policy resizes).")
    flags.DEFINE_string("camera", metaworld_env.DEFAULT_CAMERA, "Camera the policy sees.")
    flags.DEFINE_integer("video_fps", 30, "Frame rate of the written mp4s.")
    flags.DEFINE_string("dataset", "metaworld", "Which dataset's normalization stats the checkpoint acts with.")
    flags.DEFINE_enum("rollout", "auto", ["auto", "infer", "kv_cache"],
                      "auto: the KV cache for chunk-causal checkpoints, infer otherwise.")
    flags.DEFINE_integer("execute_actions", None, "Actions of each predicted chunk to run before replanning "
                         "(--rollout=infer; default: the whole chunk).")
    flags.DEFINE_enum("mode", "joint", ["joint", "imagine_then_act"], "How the checkpoint acts: video and actions "
                      "denoised jointly, or the future video first and the actions inferred from it.")
    flags.DEFINE_integer("num_steps", 4, "Denoising steps.")
    flags.DEFINE_enum("vision_ablation", "none", list(VISION_ABLATIONS), "blank: the checkpoint sees a black frame "
                      "in place of every camera (if it uses its cameras, success falls).")
    flags.DEFINE_integer("action_steps", None, "Denoising steps of the actions (default: num_steps).")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1.0 = off).")
    flags.DEFINE_float("video_stop_t", 0.0, "Noise level the video's schedule stops at (DreamZero-Flash: > 0).")
    flags.DEFINE_list("step_cache_mask", None, "DiT step caching: one 0/1 per denoising iteration (0 = reuse the "
                                               "last velocity).")
    flags.DEFINE_float("step_cache_threshold", None, "DiT step caching: skip an iteration when the last two "
                                                     "velocities' cosine similarity exceeds it.")
    flags.DEFINE_integer("cfg_parallel", 1, "2: the two CFG branches on two devices.")
    flags.DEFINE_enum("execution", "sync", ["sync", "async"], "async: real-time chunking (the next chunk is "
                      "computed while the current one runs, its first actions held as a clean prefix).")
    flags.DEFINE_float("control_hz", None, "Environment steps per second of the simulated robot: reports how much "
                                           "of the time it idles waiting for actions (needed by --execution=async).")
    flags.DEFINE_bool("through_server", False, "Serve the checkpoint with `wamjax.serving.serve` on a free local "
                      "port and act through websocket requests (openpi protocol, one request per chunk).")
    flags.DEFINE_string("openpi_python", None, "With --through_server: a Python with openpi-client installed "
                        "(its own venv); the requests then go through openpi-client itself.")
    app.run(main)
