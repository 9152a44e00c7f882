"""Acting in real time: per-stage timing, the Flash schedule, DiT step caching, CFG parallelism."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_inference import TEXT_LEN, H, W, causal_model, jitted_forward, jitted_init, random_inputs, tiny_checkpoint
from train_utils import get_config

from wamjax.diffusion.sampler import SamplerOptions, sample, step_times
from wamjax.inference import kv_cache as kv
from wamjax.inference.policy import Policy
from wamjax.inference.timing import STAGES
from wamjax.models.config import SIZES, ModelConfig


@pytest.fixture(scope="module")
def joint_model():
    cfg = ModelConfig.from_dict(SIZES["tiny"])
    return cfg, jitted_init(cfg, jax.random.key(0), (3, H, W, 16), TEXT_LEN, 8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def _args(joint_model, seed=0, batch=1):
    cfg, params = joint_model
    latents, actions, proprio, text = random_inputs(seed, batch, 3, 8)
    return (cfg, params, latents[:, :1], text, proprio, latents[:, 1:], actions), (latents, actions, proprio, text)


# --- Timing ------------------------------------------------------------------------------------------------

def _check_stages(timing: dict, iterations: int) -> None:
    assert set(STAGES) <= set(timing) and "total_ms" in timing
    assert len(timing["denoise_steps_ms"]) == iterations
    assert all(v >= 0 for v in (*(timing[k] for k in STAGES), *timing["denoise_steps_ms"]))
    total = sum(timing[k] for k in STAGES)
    assert abs(total - timing["total_ms"]) <= 0.05 * timing["total_ms"], timing
    assert sum(timing["denoise_steps_ms"]) <= timing["denoise_ms"] * 1.0001


def test_policy_timing_stages_add_up_per_iteration(checkpoint):
    policy = Policy.from_checkpoint(checkpoint, num_steps=3, cfg_scale=2.0)
    frame = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    for _ in range(2):  # the second call is compiled: its stages are the steady state
        policy.infer(frame, np.zeros(8, np.float32), "synthetic: lift the block")
        _check_stages(policy.last_timing, iterations=3)
    assert policy.last_timing["prefill_ms"] == 0.0  # a full-sequence call has no cache to fill
    assert policy.last_timing["skipped_steps"] == 0


def test_closed_loop_session_times_its_chunks():
    config = get_config("size=tiny,stage=action_tune")
    config.model.attention_layout = "chunk_causal"
    cfg = ModelConfig.from_dict({**config.model.to_dict(), "proprio_dim": config.data.proprio_dim})
    params = jitted_init(cfg, jax.random.key(8), (3, H, W, 16), TEXT_LEN, 8)
    policy = Policy(config, params, {}, options=SamplerOptions(num_steps=2))
    rng = np.random.default_rng(9)
    session = policy.start_rollout(rng.integers(0, 255, (32, 32, 3), np.uint8), np.zeros(8, np.float32), "x")
    for _ in range(2):
        session.next_actions()
        _check_stages(session.last_timing, iterations=2)
        assert session.last_timing["prefill_ms"] > 0  # the anchor, then the observation, went into the cache
        session.observe(rng.integers(0, 255, (4, 32, 32, 3), np.uint8))


# --- Flash: the video stops early, the actions denoise fully -----------------------------------------------

def test_video_stops_at_its_noise_level_while_actions_finish(joint_model):
    t, t_next = step_times(2, 3, shift=1.0, stop_t=0.6)
    np.testing.assert_allclose(t, [1.0, 0.8, 0.6])
    np.testing.assert_allclose(t_next, [0.8, 0.6, 0.6])
    args, (latents, actions, proprio, text) = _args(joint_model)
    cfg, params = joint_model
    out = sample(*args, options=SamplerOptions(num_steps=1, action_steps=1, video_stop_t=0.6))
    v = jitted_forward(cfg, params, latents, jnp.array([[0.0, 1000.0, 1000.0]]), text, actions=actions,
                       t_action=jnp.full((1,), 1000.0), proprio=proprio)
    np.testing.assert_allclose(out.actions, actions - v.actions, atol=1e-5)  # one step, all the way to t=0
    np.testing.assert_allclose(out.latents[:, 1:], latents[:, 1:] - 0.4 * v.video[:, 1:], atol=1e-5)
    with pytest.raises(ValueError, match="video_stop_t=1.0"):
        SamplerOptions(video_stop_t=1.0)


# --- DiT step caching --------------------------------------------------------------------------------------

def test_step_cache_threshold_one_equals_no_caching_and_minus_one_follows_its_rule(joint_model):
    args, _ = _args(joint_model, seed=3)
    plain = sample(*args, options=SamplerOptions(num_steps=5, cfg_scale=2.0))
    never = sample(*args, options=SamplerOptions(num_steps=5, cfg_scale=2.0, step_cache_threshold=1.0))
    np.testing.assert_allclose(never.latents, plain.latents, atol=1e-5)
    np.testing.assert_allclose(never.actions, plain.actions, atol=1e-5)
    all_on = sample(*args, options=SamplerOptions(num_steps=5, cfg_scale=2.0, step_cache_mask=(True,) * 5))
    np.testing.assert_allclose(all_on.actions, plain.actions, atol=1e-5)
    # Threshold -1 skips whenever the rule allows: iterations 0 and 1 compute, then every other one.
    always = sample(*args, options=SamplerOptions(num_steps=5, cfg_scale=2.0, step_cache_threshold=-1.0))
    mask = sample(*args, options=SamplerOptions(num_steps=5, cfg_scale=2.0,
                                                step_cache_mask=(True, True, False, True, False)))
    np.testing.assert_allclose(always.actions, mask.actions, atol=1e-5)
    np.testing.assert_allclose(always.latents, mask.latents, atol=1e-5)
    assert float(jnp.abs(mask.actions - plain.actions).max()) > 1e-4  # skipping changed the result


def test_step_cache_in_the_kv_rollout_and_policy(checkpoint):
    cfg, params, _, _ = causal_model(1, 2)
    geometry = kv.ChunkGeometry.for_model(cfg, (H, W), 2)
    latents, actions, proprio, text = random_inputs(5, 1, 3, 8)
    results = {}
    for name, extra in [("plain", {}), ("never", {"step_cache_threshold": 1.0}),
                        ("mask", {"step_cache_mask": (True, True, False, True)})]:
        options = SamplerOptions(num_steps=4, **extra)
        rollout = kv.ChunkedRollout(cfg, params, geometry, options)
        rollout.start(latents[:, :1], text, proprio)
        results[name] = rollout.generate_from(latents[:, 1:2], actions[:, :4])
    np.testing.assert_allclose(results["never"][1], results["plain"][1], atol=1e-5)
    assert float(jnp.abs(results["mask"][1] - results["plain"][1]).max()) > 1e-5

    policy = Policy.from_checkpoint(checkpoint, num_steps=4, step_cache_mask=(1, 0, 1, 0))
    policy.infer(np.zeros((32, 32, 3), np.uint8), None, "x")
    assert policy.last_timing["skipped_steps"] == 2


def test_bad_step_cache_masks_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"step_cache_mask has 3 entries; expected 4"):
        SamplerOptions(num_steps=4, step_cache_mask=(True, False, True))
    with pytest.raises(ValueError, match=r"step_cache_mask\[0\] is False"):
        SamplerOptions(num_steps=2, step_cache_mask=(False, True))
    with pytest.raises(ValueError, match="step_cache_mask and step_cache_threshold"):
        SamplerOptions(num_steps=2, step_cache_mask=(True, True), step_cache_threshold=0.9)
    with pytest.raises(ValueError, match="step_cache_threshold=1.5"):
        SamplerOptions(step_cache_threshold=1.5)


# --- CFG parallelism ---------------------------------------------------------------------------------------

def test_cfg_parallel_equals_batched_cfg_on_two_devices(joint_model):
    assert len(jax.devices()) >= 2, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    args, _ = _args(joint_model, seed=6, batch=2)
    batched = sample(*args, options=SamplerOptions(num_steps=3, cfg_scale=3.0))
    options = SamplerOptions(num_steps=3, cfg_scale=3.0, cfg_parallel=2)
    parallel = sample(*args, options=options)
    np.testing.assert_allclose(parallel.latents, batched.latents, atol=1e-5)
    np.testing.assert_allclose(parallel.actions, batched.actions, atol=1e-5)
    # The doubled batch really is split: each device runs one branch.
    hlo = sample.lower(*args, options=options).compile().as_text()
    assert "num_partitions=2" in hlo or "num_partitions = 2" in hlo

    cfg, params, _, _ = causal_model(1, 2)
    geometry = kv.ChunkGeometry.for_model(cfg, (H, W), 2)
    latents, actions, proprio, text = random_inputs(7, 1, 3, 8)
    chunks = {}
    for cfg_parallel in (1, 2):
        rollout = kv.ChunkedRollout(cfg, params, geometry, SamplerOptions(num_steps=2, cfg_scale=3.0,
                                                                          cfg_parallel=cfg_parallel))
        rollout.start(latents[:, :1], text, proprio)
        first = rollout.generate_from(latents[:, 1:2], actions[:, :4])
        if cfg_parallel == 2:
            assert len(rollout.state.cache.keys.sharding.device_set) == 2  # a KV cache half per branch
        rollout.observe(latents[:, 1:2])
        chunks[cfg_parallel] = (first, rollout.generate_from(latents[:, 2:3], actions[:, 4:]))
    for a, b in zip(jax.tree.leaves(chunks[1]), jax.tree.leaves(chunks[2]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cfg_parallel_under_a_mesh_puts_the_branches_on_its_batch_axes():
    """As compile_check traces it for a topology: the CFG pair over mesh.data=2, weights over the rest."""
    from flax import linen as nn

    from wamjax.parallel.mesh import DEFAULT_RULES, make_mesh

    cfg, params, _, _ = causal_model(1, 2)
    geometry = kv.ChunkGeometry.for_model(cfg, (H, W), 2)
    latents, actions, proprio, text = random_inputs(7, 1, 3, 8)

    def chunk(options):
        state = kv.start_rollout(cfg, geometry, options, params, latents[:, :1], text, proprio)
        return kv.generate_chunk(cfg, geometry, options, params, state, latents[:, 1:2], actions[:, :4])

    batched = chunk(SamplerOptions(num_steps=2, cfg_scale=3.0))
    mesh = make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": -1, "sequence": 1}))
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(DEFAULT_RULES)):
        parallel = chunk(SamplerOptions(num_steps=2, cfg_scale=3.0, cfg_parallel=2))
        assert parallel[0].cache.keys.sharding.spec[1] in ("data", ("data",), ("data", "fsdp"))
    for a, b in zip(jax.tree.leaves(batched[1:]), jax.tree.leaves(parallel[1:]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    wrong = make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 4, "tensor": -1, "sequence": 1}))
    with jax.set_mesh(wrong), nn.logical_axis_rules(list(DEFAULT_RULES)), \
            pytest.raises(ValueError, match=r"cfg_parallel=2 under a mesh whose batch axes .* hold 4 devices"):
        chunk(SamplerOptions(num_steps=2, cfg_scale=3.0, cfg_parallel=2))


def test_cfg_parallel_is_refused_unless_it_divides_the_devices_and_splits_cfg():
    with pytest.raises(ValueError, match=r"inference.cfg_parallel=3 does not divide the \d+ devices"):
        SamplerOptions(cfg_scale=3.0, cfg_parallel=3)
    with pytest.raises(ValueError, match="inference.cfg_parallel=2 splits a batched CFG forward"):
        SamplerOptions(cfg_scale=1.0, cfg_parallel=2)


# --- The server carries the policy's timing --------------------------------------------------------------

def test_server_replies_carry_server_and_policy_timing(checkpoint):
    from test_serving import libero_observation

    from wamjax.serving.client import PolicyClient, ServerError
    from wamjax.serving.serve import PolicyServer

    server = PolicyServer(Policy.from_checkpoint(checkpoint, num_steps=2), port=0)
    server.start_in_thread()
    prefix = np.random.default_rng(4).uniform(-1, 1, (2, 7)).astype(np.float32)
    try:
        rng = np.random.default_rng(0)
        with PolicyClient("127.0.0.1", server.port) as client:
            replies = [client.infer(libero_observation(rng)) for _ in range(2)]
            replies.append(client.infer({**libero_observation(rng), "action_prefix": prefix}))
            with pytest.raises(ServerError, match="action_prefix holds 9 actions; the chunk has 8"):
                client.infer({**libero_observation(rng), "action_prefix": np.zeros((9, 7), np.float32)})
    finally:
        server.stop()
    np.testing.assert_array_equal(replies[-1]["actions"][:2], prefix)  # a clean prefix comes back unchanged
    for reply in replies:
        assert reply["server_timing"]["infer_ms"] > 0 and "queue_ms" in reply["server_timing"]
        _check_stages(reply["policy_timing"], iterations=2)
        # The policy's stages happen inside the server's infer_ms.
        assert reply["policy_timing"]["total_ms"] <= reply["server_timing"]["infer_ms"] * 1.0001


@pytest.mark.parametrize("config_arg", ["configs/lab.py:flash=1", "configs/dreamzero_flash.py:size=tiny"])
def test_flash_configs_train_video_high_and_hold_valid_sampler_settings(config_arg):
    import os

    from train_utils import REPO

    from wamjax import config_files

    config = config_files.get_config(os.path.join(REPO, config_arg))
    assert config.diffusion.video_time_sampling == "beta" and config.diffusion.action_time_sampling == "uniform"
    assert (config.diffusion.beta_a, config.diffusion.beta_b) == (7.0, 1.0)
    options = SamplerOptions(**config.inference)
    assert options.resolved_action_steps == 1 and options.video_stop_t > 0
    if "dreamzero" in config_arg:
        assert options.cfg_parallel == 2 and options.step_cache_threshold == 0.95
    with pytest.raises(ValueError, match="flash='yes'"):
        config_files.get_config(os.path.join(REPO, "configs/lab.py:flash=yes"))


# --- Asynchronous execution: a clean action prefix -----------------------------------------------------------

def test_clean_action_prefix_is_returned_unchanged_and_conditions_the_rest(joint_model):
    args, (_, actions, _, _) = _args(joint_model, seed=8)
    prefix = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 7)), jnp.float32)
    options = SamplerOptions(num_steps=3)
    free = sample(*args, options=options)
    held = sample(*args, options=options, action_prefix=prefix)
    np.testing.assert_array_equal(held.actions[:, :3], prefix)
    assert float(jnp.abs(held.actions[:, 3:] - free.actions[:, 3:]).max()) > 1e-4  # the rest read the prefix
    with pytest.raises(ValueError, match=r"action_prefix holds 9 actions; the chunk has 8"):
        sample(*args, options=options, action_prefix=jnp.zeros((1, 9, 7)))


def test_policy_action_prefix_and_the_async_agent(checkpoint):
    from wamjax.eval.agents import AsyncPolicyAgent, PolicyAgent
    from wamjax.eval.rollout import run_episode
    from wamjax.sim import metaworld_env

    policy = Policy.from_checkpoint(checkpoint, num_steps=2)
    frame = np.random.default_rng(2).integers(0, 255, (32, 32, 3), np.uint8)
    prefix = np.random.default_rng(3).uniform(-1, 1, (2, 7)).astype(np.float32)
    out = policy.infer(frame, None, "x", action_prefix=prefix)
    np.testing.assert_array_equal(out["actions"][:2], prefix)
    with pytest.raises(ValueError, match="action_prefix holds 9 actions; the chunk has 8"):
        policy.infer(frame, None, "x", action_prefix=np.zeros((9, 7), np.float32))

    class Recording:
        """The policy, with a record of each call's prefix and chunk."""

        def __init__(self, policy):
            self.policy, self.calls = policy, []

        def __getattr__(self, name):
            return getattr(self.policy, name)

        def infer(self, *args, action_prefix=None, **kwargs):
            out = self.policy.infer(*args, action_prefix=action_prefix, **kwargs)
            self.calls.append((None if action_prefix is None else np.array(action_prefix), out["actions"]))
            return out

    class StillEnv:
        """A simulator with nothing to simulate: a constant frame, 8-D proprio, no success before max_steps."""

        task = "reach-v3"

        def reset(self, seed, variant):
            pass

        def render(self, camera=None):
            return frame

        def proprio(self):
            return np.zeros(8, np.float32)

        def step(self, action):
            return metaworld_env.StepResult(np.zeros(39), 0.0, False, False)

    recording = Recording(policy)
    agent = AsyncPolicyAgent(recording, control_hz=1e-3)  # slow robot: every inference hides behind its prefix
    result, _ = run_episode(agent, StillEnv(), 0, 0, max_steps=40)
    calls = recording.calls[agent.chunk:]  # after the one compiled call per prefix length
    assert calls[0][0] is None and len(calls) >= 3
    for (_, previous), (prefix, chunk) in zip(calls[:-1], calls[1:], strict=True):
        # Each chunk starts with the tail of the one before, the actions that ran while it was computed.
        assert prefix is not None and len(prefix) >= 1
        np.testing.assert_array_equal(prefix, previous[len(previous) - len(prefix):])
        np.testing.assert_array_equal(chunk[: len(prefix)], prefix)
    assert result.idle_seconds <= result.act_seconds and 0 < result.moving_seconds
    sync, _ = run_episode(PolicyAgent(policy, control_hz=1e-3), StillEnv(), 0, 0, max_steps=40)
    # A synchronous robot waits through every inference (act() also renders the cameras).
    assert 0 < sync.idle_seconds <= sync.act_seconds and sync.idle_seconds > result.idle_seconds / 2
    with pytest.raises(ValueError, match="control_hz=0"):
        AsyncPolicyAgent(policy, control_hz=0)


def test_policy_with_cfg_parallel_equals_batched_cfg(checkpoint):
    frame = np.random.default_rng(5).integers(0, 255, (32, 32, 3), np.uint8)
    chunks = [Policy.from_checkpoint(checkpoint, num_steps=2, cfg_scale=3.0, cfg_parallel=k).infer(frame, None, "x")
              for k in (1, 2)]
    np.testing.assert_allclose(chunks[1]["actions"], chunks[0]["actions"], atol=1e-5)


def test_a_clean_action_prefix_in_the_kv_cache_rollout_of_a_teacher_forced_model():
    from test_inference import teacher_forced_model

    config, params, frame, proprio, prompt = teacher_forced_model()
    make = lambda: Policy(config, params, {}, options=SamplerOptions(num_steps=2), seed=4)
    prefix = np.random.default_rng(5).uniform(-1, 1, (5, 7)).astype(np.float32)  # chunk 1 whole, 1 of chunk 2
    free = make().infer(frame, proprio, prompt)["actions"]
    held = make().infer(frame, proprio, prompt, action_prefix=prefix)["actions"]
    np.testing.assert_array_equal(held[:5], prefix)  # returned exactly as given
    assert float(np.abs(held[5:] - free[5:]).max()) > 1e-4  # the rest read it
    # The same as the KV-cache session given each chunk's part of the prefix.
    session = make().start_rollout(frame, proprio, prompt)
    first = session.next_actions(action_prefix=prefix[:4])
    session.keep_prediction()
    second = session.next_actions(action_prefix=prefix[4:])
    np.testing.assert_allclose(held, np.concatenate([first, second]), atol=1e-6)
    with pytest.raises(ValueError, match=r"action_prefix holds 9 actions; the chunk has 8"):
        make().infer(frame, proprio, prompt, action_prefix=np.zeros((9, 7), np.float32))
    session = make().start_rollout(frame, proprio, prompt)
    with pytest.raises(ValueError, match=r"action_prefix holds 5 actions; the chunk has 4"):
        session.next_actions(action_prefix=prefix)
    with pytest.raises(ValueError, match=r"action_prefix is supported in mode 'joint'"):
        make().infer(frame, proprio, prompt, action_prefix=prefix, mode="imagine_then_act")
