"""Co-training in the action stage: video-only examples mix in with their action loss masked per example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import get_config

from wamjax.models.config import model_config_from_run
from wamjax.models.wam import init_params
from wamjax.stages import stage_spec
from wamjax.train.step import StepSpec, compute_loss, example_rngs


def _batch(r: np.random.Generator, n: int, num_actions: int, cfg) -> dict:
    f32 = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return {
        "actions": f32(n, num_actions, cfg.action_dim), "action_mask": jnp.ones((n, num_actions), bool),
        "proprio": f32(n, cfg.proprio_dim), "text_embeddings": f32(n, 8, cfg.text_dim),
    }


def test_action_loss_is_masked_exactly_for_video_only_examples():
    config = get_config("size=tiny,stage=action_tune")
    cfg = model_config_from_run(config)
    frames, num_actions = 3, 8
    params = jax.jit(init_params, static_argnums=(0, 2, 3, 4))(cfg, jax.random.key(0), (frames, 4, 4, 16), 8, 8)
    spec = StepSpec(model=cfg, mode="joint", clean_context_frames=1, vae=None)
    loss_fn = jax.jit(lambda p, x0, batch, rng: compute_loss(spec, config.diffusion, p, x0, batch, rng)[1])
    r = np.random.default_rng(0)
    robot = _batch(r, 2, num_actions, cfg)
    video = _batch(r, 2, num_actions, cfg)
    video["actions"] = video["actions"] * 1e3  # garbage that must not reach the loss
    x0 = jnp.asarray(r.standard_normal((4, frames, 4, 4, 16)), jnp.float32)
    mixed = {k: jnp.concatenate([robot[k], video[k]]) for k in robot}
    mixed["has_actions"] = jnp.asarray([True, True, False, False])
    robot["has_actions"] = jnp.ones(2, bool)
    # Each example draws its times and noise from its own key, so the robot examples, leading the mixed
    # batch, draw the same as when they are the whole batch: the separately computed loss is comparable exactly.
    rng = example_rngs(jax.random.key(7), 4)
    both = loss_fn(params, x0, mixed, rng)
    alone = loss_fn(params, x0[:2], robot, rng[:2])
    assert float(both["actions_share"]) == 0.5 and float(alone["actions_share"]) == 1.0
    assert float(both["loss_action"]) == pytest.approx(float(alone["loss_action"]), rel=1e-6)
    assert float(both["loss_video"]) != pytest.approx(float(alone["loss_video"]), rel=1e-3)  # video trains on all
    # Without has_actions the garbage would count: the mask is what keeps it out.
    unmasked = loss_fn(params, x0, {k: v for k, v in mixed.items() if k != "has_actions"}, rng)
    assert float(unmasked["loss_action"]) > 100 * float(both["loss_action"])
    # An all-video batch trains video only.
    only_video = dict(mixed, has_actions=jnp.zeros(4, bool))
    out = loss_fn(params, x0, only_video, rng)
    assert float(out["loss_action"]) == 0.0 and float(out["actions_share"]) == 0.0
    assert float(out["loss"]) == pytest.approx(config.diffusion.video_loss_weight * float(out["loss_video"]))


def test_video_shards_mix_into_the_stage_their_weight_names():
    config = get_config("size=tiny,stage=all")
    config.data.video_weight, config.data.action_stage_video_weight = 0.3, 0.2
    assert stage_spec(config, "video_pretrain").video_weight == 0.3
    assert stage_spec(config, "action_tune").video_weight == 0.2


def test_action_horizon_sizes_the_clip_and_must_match_the_model():
    from data_pipelines.sources.synthetic import make_synthetic_dataset

    config = get_config("size=tiny,stage=action_tune")
    config.data.frame_stride, config.data.action_horizon = 2, 8  # 4 frames per chunk, 8 steps' actions
    with pytest.raises(ValueError, match="model.action_frames_per_latent=4 .* set model.action_frames_per_latent=8"):
        stage_spec(config, "action_tune")
    config.model.action_frames_per_latent = 8
    assert stage_spec(config, "action_tune").clip.actions == 16
    config.data.batch_size = 2
    batch = next(iter(make_synthetic_dataset(config.data)))
    assert batch["actions"].shape == (2, 16, 7) and batch["action_mask"].all() and batch["has_actions"].all()
