"""One checkpoint, three ways to act: the clean-modality training draw, the sampler holding one modality clean,
and the policy's modes (joint, imagine_then_act, world model) on a tiny checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inference import TEXT_LEN, H, causal_model, jitted_forward, jitted_init, random_inputs, tiny_checkpoint
from train_utils import get_config

from wamjax.diffusion import flow
from wamjax.diffusion.modes import action_prefix_settings, clean_probs, draw_action_prefix
from wamjax.diffusion.sampler import SamplerOptions, sample, step_times
from wamjax.diffusion.time_sampling import sample_chunk_times
from wamjax.inference import kv_cache as kv
from wamjax.inference.policy import Policy
from wamjax.inference.policy_step import imagine_then_act
from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.token_layout import action_latent_frame, latent_frame_chunk
from wamjax.serving.serve import PolicyServer
from wamjax.train.step import StepSpec, compute_loss, example_rngs

B, F, T_A = 4, 3, 8


@pytest.fixture(scope="module")
def joint_model():
    cfg = ModelConfig.from_dict(SIZES["tiny"])
    return cfg, jitted_init(cfg, jax.random.key(0), (F, H, H, 16), TEXT_LEN, T_A)


def _diffusion(**values):
    d = get_config("size=tiny,stage=action_tune").diffusion
    d.text_dropout = 0.0
    d.update(values)
    return d


def _loss(cfg, params, diffusion, seed=0):
    x0, actions, proprio, text = random_inputs(seed, B, F, T_A)
    batch = {"text_embeddings": text, "actions": actions, "proprio": proprio,
             "action_mask": jnp.ones((B, T_A), bool)}
    spec = StepSpec(model=cfg, mode="joint", clean_context_frames=1, vae=None)
    fn = jax.jit(lambda p, x, bt, r: compute_loss(spec, diffusion, p, x, bt, r)[1])
    return fn(params, x0, batch, example_rngs(jax.random.key(7), B)), (x0, batch)


def _noised_by_hand(cfg, diffusion, x0, actions):
    """The times and noises compute_loss draws from key 7 (one key per example, each split into five)."""
    keys = jax.vmap(lambda r: jax.random.split(r, 5))(example_rngs(jax.random.key(7), B))
    rng_tv, rng_ta, rng_nv, rng_na = (keys[:, i] for i in range(4))
    chunks = latent_frame_chunk(cfg, F)
    t_video = sample_chunk_times(rng_tv, chunks, diffusion).at[:, 0].set(0.0)
    t_action = sample_chunk_times(rng_ta, chunks[np.minimum(action_latent_frame(cfg, T_A), F - 1)], diffusion,
                                  "action")
    normal = lambda rngs, shape: jax.vmap(lambda r: jax.random.normal(r, shape[1:]))(rngs)
    return t_video, t_action, normal(rng_nv, x0.shape), normal(rng_na, actions.shape)


def test_clean_modality_draw_holds_it_at_t0_and_drops_its_loss(joint_model):
    cfg, params = joint_model
    d = _diffusion(clean_video_prob=1.0)
    metrics, (x0, batch) = _loss(cfg, params, d)
    assert float(metrics["loss_video"]) == 0.0  # the clean video is an input, not a target
    t_video, t_action, _, action_noise = _noised_by_hand(cfg, d, x0, batch["actions"])
    # Every example's video enters clean (t_video = 0); the actions are noised as in a joint example.
    out = jitted_forward(cfg, params, x0, jnp.zeros((B, F)), batch["text_embeddings"],
                         actions=flow.add_noise(batch["actions"], action_noise, t_action),
                         t_action=flow.to_model_timestep(t_action), proprio=batch["proprio"])
    expected = jnp.mean(jnp.square(out.actions - (action_noise - batch["actions"])))
    np.testing.assert_allclose(metrics["loss_action"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)

    d = _diffusion(clean_action_prob=1.0)
    metrics, _ = _loss(cfg, params, d)
    assert float(metrics["loss_action"]) == 0.0
    t_video, _, noise, _ = _noised_by_hand(cfg, d, x0, batch["actions"])
    out = jitted_forward(cfg, params, flow.add_noise(x0, noise, t_video), flow.to_model_timestep(t_video),
                         batch["text_embeddings"], actions=batch["actions"], t_action=jnp.zeros((B, T_A)),
                         proprio=batch["proprio"])
    expected = jnp.mean(jnp.square(out.video - (noise - x0))[:, 1:])
    np.testing.assert_allclose(metrics["loss_video"], expected, rtol=1e-5)


def test_default_shares_keep_the_joint_loss(joint_model):
    cfg, params = joint_model
    default, _ = _loss(cfg, params, _diffusion())
    legacy = _diffusion()
    del legacy["clean_video_prob"], legacy["clean_action_prob"]  # a run config from before the keys
    before, _ = _loss(cfg, params, legacy)
    for key in ("loss", "loss_video", "loss_action"):
        assert float(default[key]) == float(before[key])
    # A draw that picks no example leaves the joint loss as it was (up to the order of the sums).
    none_drawn, _ = _loss(cfg, params, _diffusion(clean_video_prob=1e-9, clean_action_prob=1e-9))
    np.testing.assert_allclose(none_drawn["loss"], default["loss"], rtol=1e-6)
    # Half the examples clean: a different loss.
    half, _ = _loss(cfg, params, _diffusion(clean_video_prob=0.5))
    assert abs(float(half["loss"]) - float(default["loss"])) > 1e-4
    with pytest.raises(ValueError, match="clean_video_prob \\+ diffusion.clean_action_prob"):
        clean_probs(_diffusion(clean_video_prob=0.6, clean_action_prob=0.5))
    with pytest.raises(ValueError, match="diffusion.clean_action_prob=-0.1"):
        clean_probs(_diffusion(clean_action_prob=-0.1))


def test_a_clean_action_prefix_enters_at_t0_and_leaves_the_loss(joint_model):
    cfg, params = joint_model
    d = _diffusion(action_prefix_prob=1.0, action_prefix_max=3)
    metrics, (x0, batch) = _loss(cfg, params, d)
    prefix = draw_action_prefix(example_rngs(jax.random.key(7), B), d, T_A)
    lengths = np.asarray(prefix).sum(axis=1)
    assert prefix.shape == (B, T_A) and set(lengths) <= {1, 2, 3} and len(set(lengths)) > 1
    assert all(np.asarray(prefix)[i, : lengths[i]].all() for i in range(B))  # the first k of each example
    t_video, t_action, noise, action_noise = _noised_by_hand(cfg, d, x0, batch["actions"])
    t_action = jnp.where(prefix, 0.0, t_action)
    out = jitted_forward(cfg, params, flow.add_noise(x0, noise, t_video), flow.to_model_timestep(t_video),
                         batch["text_embeddings"], actions=flow.add_noise(batch["actions"], action_noise, t_action),
                         t_action=flow.to_model_timestep(t_action), proprio=batch["proprio"])
    err = jnp.mean(jnp.square(out.actions - (action_noise - batch["actions"])), axis=-1)
    expected = jnp.sum(err * ~prefix) / jnp.sum(~prefix)
    np.testing.assert_allclose(metrics["loss_action"], expected, rtol=1e-5)
    default, _ = _loss(cfg, params, _diffusion())
    assert abs(float(metrics["loss_action"]) - float(default["loss_action"])) > 1e-5
    # Never the whole chunk: with the default maximum, the last action is always a target.
    full = draw_action_prefix(example_rngs(jax.random.key(3), 64), _diffusion(action_prefix_prob=1.0), T_A)
    assert not np.asarray(full)[:, -1].any() and np.asarray(full).sum(axis=1).max() == T_A - 1
    assert draw_action_prefix(example_rngs(jax.random.key(3), 4), _diffusion(), T_A) is None
    with pytest.raises(ValueError, match=r"diffusion.action_prefix_prob=1.5"):
        action_prefix_settings(_diffusion(action_prefix_prob=1.5))
    with pytest.raises(ValueError, match=r"diffusion.action_prefix_max=-1"):
        action_prefix_settings(_diffusion(action_prefix_max=-1))


def _euler_by_hand(cfg, params, latents, text, proprio, actions, times, hold):
    """Euler steps through wam_forward with one modality held: 'video' clean at t=0 (all frames), 'actions'
    clean at t=0. Returns (latents, actions)."""
    video, acts = latents, actions
    for t, t_next in zip(*times, strict=True):
        t_frames = jnp.zeros((1, F)) if hold == "video" else jnp.array([[0.0] + [t * 1000.0] * (F - 1)])
        t_acts = jnp.zeros((1,)) if hold == "actions" else jnp.full((1,), t * 1000.0)
        out = jitted_forward(cfg, params, video, t_frames, text, actions=acts, t_action=t_acts, proprio=proprio)
        if hold == "video":
            acts = acts + (t_next - t) * out.actions
        else:
            video = video.at[:, 1:].add((t_next - t) * out.video[:, 1:])
    return video, acts


def test_sampler_holds_one_modality_clean(joint_model):
    cfg, params = joint_model
    latents, actions, proprio, text = random_inputs(3, 1, F, T_A)
    noise_v, noise_a, _, _ = random_inputs(4, 1, F, T_A)
    options = SamplerOptions(num_steps=3, action_steps=2, shift=2.0)
    # Inverse dynamics: the given future is held clean; only the actions move, on their own schedule.
    inv = sample(cfg, params, latents[:, :1], text, proprio, None, noise_a, options=options,
                 clean_future=latents[:, 1:])
    np.testing.assert_array_equal(inv.latents, latents)
    ref_video, ref_actions = _euler_by_hand(cfg, params, latents, text, proprio, noise_a,
                                            step_times(2, 2, 2.0), "video")
    np.testing.assert_allclose(inv.actions, ref_actions, atol=1e-5)
    # World model: the given actions are held clean; only the future frames move.
    wm = sample(cfg, params, latents[:, :1], text, proprio, noise_v[:, 1:], None, options=options,
                clean_actions=actions)
    np.testing.assert_array_equal(wm.actions, actions)
    ref_video, _ = _euler_by_hand(cfg, params, jnp.concatenate([latents[:, :1], noise_v[:, 1:]], 1), text,
                                  proprio, actions, step_times(3, 3, 2.0), "actions")
    np.testing.assert_allclose(wm.latents, ref_video, atol=1e-5)
    # Imagine then act == the joint denoiser at t_video = 0 on the imagined video.
    both = imagine_then_act(cfg, params, latents[:, :1], text, proprio, noise_v[:, 1:], noise_a, options)
    imagined = sample(cfg, params, latents[:, :1], text, proprio, noise_v[:, 1:], noise_a, options=options,
                      freeze_actions=True)
    np.testing.assert_array_equal(imagined.actions, noise_a)  # frozen at their noise
    np.testing.assert_allclose(both.latents, imagined.latents, atol=1e-6)
    _, ref_actions = _euler_by_hand(cfg, params, both.latents, text, proprio, noise_a, step_times(2, 2, 2.0),
                                    "video")
    np.testing.assert_allclose(both.actions, ref_actions, atol=1e-5)
    joint = sample(cfg, params, latents[:, :1], text, proprio, noise_v[:, 1:], noise_a, options=options)
    assert float(jnp.abs(joint.actions - both.actions).max()) > 1e-4
    with pytest.raises(ValueError, match="hold the actions one way"):
        sample(cfg, params, latents[:, :1], text, proprio, noise_v[:, 1:], None, options=options,
               clean_actions=actions, freeze_actions=True)


def test_cached_imagine_then_act_equals_uncached():
    """On a chunk-causal model the KV-cache rollout's imagine_then_act chunk == the full-sequence sampler's."""
    cfg, params, frames, num_actions = causal_model(1, 1)
    latents, _, proprio, text = random_inputs(5, 1, frames, num_actions)
    noise_v, noise_a, _, _ = random_inputs(6, 1, frames, num_actions)
    options = SamplerOptions(num_steps=3, action_steps=2)
    rollout = kv.ChunkedRollout(cfg, params, kv.ChunkGeometry.for_model(cfg, (H, H), 1), options,
                                mode="imagine_then_act")
    rollout.start(latents[:, :1], text, proprio)
    video, actions = rollout.generate_from(noise_v[:, 1:], noise_a)
    ref = imagine_then_act(cfg, params, latents[:, :1], text, proprio, noise_v[:, 1:], noise_a, options)
    np.testing.assert_allclose(video, ref.latents[:, 1:], atol=1e-4)
    np.testing.assert_allclose(actions, ref.actions, atol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def test_policy_modes_shapes_and_world_model(checkpoint):
    policy = Policy.from_checkpoint(checkpoint, num_steps=2, mode="imagine_then_act")
    assert policy.metadata["mode"] == "imagine_then_act"
    assert PolicyServer(policy).metadata["mode"] == "imagine_then_act"  # what `serve --mode=...` reports
    frame = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    horizon = (policy.num_actions, policy.model_config.action_dim)
    outs = {mode: policy.infer(frame, None, "pick up the block", mode=mode, return_latents=True)
            for mode in ("joint", "imagine_then_act")}
    for out in outs.values():
        assert out["actions"].shape == horizon and np.all(np.isfinite(out["actions"]))
        assert out["latents"].shape[0] == policy.num_latent_frames
    assert policy.infer(frame, None, "pick up the block")["actions"].shape == horizon  # the default mode
    imagined = policy.imagine(frame, outs["joint"]["actions"], "pick up the block")
    assert imagined["frames"].shape == (policy.num_frames, *policy.resolution, 3)
    assert imagined["frames"].dtype == np.uint8
    assert imagined["latents"].shape == outs["joint"]["latents"].shape
    other = policy.imagine(frame, np.zeros(horizon, np.float32), "pick up the block")
    assert np.abs(other["latents"][1:] - imagined["latents"][1:]).max() > 0  # the actions change the future
    with pytest.raises(ValueError, match="mode='dream'"):
        policy.infer(frame, None, "x", mode="dream")
    with pytest.raises(ValueError, match="actions have shape"):
        policy.imagine(frame, np.zeros((3, 7), np.float32), "x")
