"""What acts in a closed-loop episode: Meta-World's scripted expert, random and replay baselines, and a checkpoint
acting chunk by chunk through `wamjax.inference.Policy` (synchronously, or with real-time chunking)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from wamjax.checkpoint.load import load_model_run_config, load_norm_stats
from wamjax.checkpoint.norm_stats import checked_norm_stats
from wamjax.inference.policy import Policy
from wamjax.sim import metaworld_env


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
            dim = self.policy.robot_action_dim
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


def stats_dataset(checkpoint: str, dataset: str | None) -> str | None:
    """`dataset` when the checkpoint has its normalization stats, None when its run's data was synthetic
    (a checkpoint of real data without stats is refused)."""
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
