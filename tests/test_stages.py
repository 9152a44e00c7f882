"""The run config resolved once per stage: one model derivation, one count of actions per clip, the stage's
overrides and sentinels applied, and bad names refused by key."""

from __future__ import annotations

import pytest
from train_utils import get_config

from wamjax import stages
from wamjax.flops.stage import train_step_flops
from wamjax.models.config import model_config_from_run


def test_one_model_config_for_the_loop_and_the_flop_count():
    config = get_config("size=tiny,stage=action_tune")
    config.data.proprio_dim = 5  # the data's proprio size, not the model block's default 8
    spec = stages.stage_spec(config, "action_tune")
    assert spec.model == model_config_from_run(config) and spec.model.proprio_dim == 5
    flops = train_step_flops(spec)
    config.data.proprio_dim = 8
    assert train_step_flops(stages.stage_spec(config, "action_tune")).forward_per_sample > flops.forward_per_sample


def test_actions_per_clip_with_and_without_action_horizon():
    config = get_config("size=tiny,stage=action_tune")
    spec = stages.stage_spec(config, "action_tune")
    assert spec.clip.actions == config.data.num_frames - 1 == spec.action_tokens
    assert stages.stage_spec(config, "video_pretrain").action_tokens == 0
    config.data.frame_stride, config.data.action_horizon = 2, 8
    with pytest.raises(ValueError, match="model.action_frames_per_latent=4"):
        stages.stage_spec(config, "action_tune")
    config.model.action_frames_per_latent = 8
    spec = stages.stage_spec(config, "action_tune")
    assert spec.clip.actions == 16 and train_step_flops(spec).action_tokens == 16


def test_stage_overrides_and_sentinels_are_resolved():
    config = get_config("size=tiny,stage=all")
    config.stages.action_tune.cameras = "primary,wrist"
    config.data.view_layout = "tokens"
    config.stages.action_tune.learning_rate, config.stages.action_tune.warmup_steps = 1e-4, 2
    config.stages.video_pretrain.steps = 7
    pre, tune = stages.stage_specs(config)
    assert (pre.name, tune.name) == stages.STAGES
    assert (pre.clip.cameras, pre.views) == (("primary",), None)
    assert (tune.clip.cameras, tune.views) == (("primary", "wrist"), 2)
    assert tune.latent_shape[1] == 2  # a views axis in the model's latents
    assert (pre.optimizer.learning_rate, pre.optimizer.warmup_steps) == (config.optim.learning_rate,
                                                                         config.optim.warmup_steps)
    assert (tune.optimizer.learning_rate, tune.optimizer.warmup_steps) == (1e-4, 2)
    assert (pre.steps, tune.steps) == (7, config.train.steps)
    assert (pre.clean_context_frames, tune.clean_context_frames) == (0, 1)
    assert stages.policy_spec(config).stage == "action_tune"
    assert stages.policy_spec(config).clip.cameras == ("primary", "wrist")


def test_image_conditioned_spec_carries_its_image_encoder():
    config = get_config("size=tiny-i2v,stage=action_tune")
    spec = stages.stage_spec(config, "action_tune")
    assert spec.image_encoder is not None and spec.image_encoder.hidden_size == spec.model.image_dim
    assert spec.latent_shape[-1] == spec.model.in_channels == 36
    assert stages.stage_spec(get_config("size=tiny"), "video_pretrain").image_encoder is None


def test_bad_stage_name_and_keys_are_refused_by_name():
    config = get_config("size=tiny,stage=action_tune")
    with pytest.raises(KeyError, match="'finetune' is not in config.stages"):
        stages.stage_spec(config, "finetune")
    config.stage = "finetune"
    with pytest.raises(KeyError, match="stage='finetune'"):
        stages.stage_list(config)
    config = get_config("size=tiny,stage=action_tune")
    config.stages.action_tune.mode = "idm"
    with pytest.raises(ValueError, match=r"stages.action_tune.mode='idm'"):
        stages.stage_spec(config, "action_tune")
    config.stages.action_tune.mode = "joint"
    config.stages.action_tune.trainable = "heads"
    with pytest.raises(ValueError, match=r"stages.action_tune.trainable='heads'"):
        stages.stage_spec(config, "action_tune")
    config.stages.action_tune.trainable = "all"
    config.diffusion.time_sampling = "gaussian"
    with pytest.raises(ValueError, match="diffusion.time_sampling"):
        stages.stage_spec(config, "action_tune")
