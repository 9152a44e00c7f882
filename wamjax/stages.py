"""The one place a run config becomes what each stage runs: a frozen `StageSpec` per stage, and the policy's.

The loop, the compile check, the FLOP counts, evaluation, inference and export read these specs; none of them
re-derives a stage's model, data, actions per clip, cameras, trainable set or schedule from the ConfigDict.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import ml_collections

from data_pipelines.clips import views as views_lib
from data_pipelines.config import clip_num_states, num_clip_actions
from wamjax.diffusion.time_sampling import check_diffusion_config, time_sampling
from wamjax.models import clip as clip_lib
from wamjax.models import vae as vae_lib
from wamjax.models.config import ModelConfig, model_config_from_run
from wamjax.models.wam import I2V_MASK_CHANNELS

STAGES = ("video_pretrain", "action_tune")  # the order a `stage=all` run executes them in
MODES = ("video", "joint")
TRAINABLE_CHOICES = ("all", "actions", "actions+blocks", "lora")


def is_trainable(name: str, trainable: str) -> bool:
    """Whether the parameter called `name` trains under the stage's `trainable` setting."""
    if trainable == "all":
        return True
    if trainable == "actions":
        return name.startswith("actions/")
    if trainable == "actions+blocks":
        return name.startswith("actions/") or name.startswith("blocks/")
    if trainable == "lora":  # the adapters, and the action and proprio modules trained in full
        return name.startswith("actions/") or name.rsplit("/", 1)[-1] in ("lora_a", "lora_b")
    if trainable.startswith("regex:"):
        return re.search(trainable[len("regex:") :], name) is not None
    raise ValueError(f"stages.<stage>.trainable={trainable!r}; expected one of {TRAINABLE_CHOICES} or 'regex:...'")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What one clip of a stage's data holds, and how its cameras reach the model."""

    data: ml_collections.ConfigDict  # config.data with the stage's overrides applied (a copy)
    num_frames: int
    resolution: tuple[int, int]
    batch_size: int  # global
    actions: int  # actions per clip (every dataset step's with data.action_horizon > 0)
    states: int | None  # proprio states per clip: None for one ([proprio_dim]), else one per chunk
    proprio_dim: int
    cameras: tuple[str, ...]  # in the order a policy takes them; ("primary",) when data.cameras is unset
    view_layout: str  # "tile" | "tokens"
    views: int | None  # length of the frames' views axis (tokens layout with cameras set), else None
    latents_cache: str  # "" when frames are encoded in the step

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A stage's optimizer: `optim.*` with the stage's learning rate and warmup (their -1 sentinels resolved)."""

    optim: ml_collections.ConfigDict
    learning_rate: float
    warmup_steps: int
    trainable: str

    @property
    def ema_decay(self) -> float:
        return float(self.optim.ema_decay)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """Everything one training stage runs with, resolved from the run config once."""

    name: str
    mode: str  # "video" | "joint"
    model: ModelConfig
    clip: ClipSpec
    optimizer: OptimizerSpec
    clean_context_frames: int
    steps: int  # configured steps (stages.<stage>.steps, else train.steps); a budget may buy fewer
    budget_flops: float  # 0: no budget
    init_from: str
    vae: Any  # VAEConfig or PatchVAEConfig of vae.size
    image_encoder: clip_lib.CLIPVisionConfig | None  # the frozen CLIP tower of an image-conditioned model
    text_length: int
    diffusion: ml_collections.ConfigDict
    time_sampling: tuple[str, str]  # (video, action) training time distributions
    microbatches: int
    video_weight: float  # mixture weight of the captioned-video shards in this stage
    seed: int  # train.seed
    save_adapters_only: bool = False  # lora.save_adapters_only on a trainable=lora stage

    @property
    def data(self) -> ml_collections.ConfigDict:
        return self.clip.data

    @property
    def joint(self) -> bool:
        return self.mode == "joint"

    @property
    def trainable(self) -> str:
        return self.optimizer.trainable

    @property
    def action_tokens(self) -> int:
        """Action tokens per sample the model reads: the clip's actions in joint mode, none in video mode."""
        return self.clip.actions if self.joint else 0

    @property
    def proprio_tokens(self) -> int:
        """Proprio tokens per sample: one, or one per chunk, in joint mode; none in video mode."""
        return (self.clip.states or 1) if self.joint else 0

    @property
    def views(self) -> int | None:
        return self.clip.views

    @property
    def uses_latents_cache(self) -> bool:
        return bool(self.clip.latents_cache)

    @property
    def vae_latent_shape(self) -> tuple[int, int, int, int]:
        """(frames, height, width, z_dim) of one view's VAE latents."""
        h, w = self.clip.resolution
        return tuple(vae_lib.latent_shape(self.vae, (1, self.clip.num_frames, h, w, 3))[1:])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(F, H, W, C) of the model's latent input, or (F, V, H, W, C) with a views axis (tokens layout); C is
        model.in_channels (an image-conditioned model's noisy, mask and conditioning channels). Raises naming the
        keys when the VAE's latents do not fit the model."""
        f, lh, lw, z = self.vae_latent_shape
        cfg = self.model
        if cfg.image_conditioned:
            if cfg.in_channels != 2 * z + I2V_MASK_CHANNELS or cfg.out_channels != z:
                raise ValueError(f"model.in_channels={cfg.in_channels}, model.out_channels={cfg.out_channels}: an "
                                 f"image-conditioned model on a VAE with z_dim {z} needs "
                                 f"{2 * z + I2V_MASK_CHANNELS} and {z}")
            if self.uses_latents_cache:
                raise ValueError("data.latents_cache is not supported for image-conditioned models "
                                 "(model.image_dim): the step encodes the first frame and its CLIP tokens from the "
                                 "clip's frames")
        elif z != cfg.in_channels:
            raise ValueError(f"VAE z_dim {z} != model.in_channels {cfg.in_channels}")
        c = cfg.in_channels
        return (f, lh, lw, c) if self.views is None else (f, self.views, lh, lw, c)


def stage_list(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages a run executes, in order: `STAGES` for `stage=all`, else the one `config.stage` names."""
    stage = str(config.stage)
    if stage == "all":
        return STAGES
    _check_stage_name(config, stage, "stage")
    return (stage,)


def resolve_stage(config: ml_collections.ConfigDict, stage: str | None = None) -> str:
    """`stage`, else the config's (its first one when it runs `all`), checked against config.stages."""
    name = stage or str(config.stage)
    if name == "all":
        name = STAGES[0]
    _check_stage_name(config, name, "stage")
    return name


def _check_stage_name(config: ml_collections.ConfigDict, name: str, key: str) -> None:
    known = sorted(config.stages.keys()) if "stages" in config else []
    if name not in known:
        raise KeyError(f"{key}={name!r}: stage {name!r} is not in config.stages; known: {known}")


def stage_data_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """config.data with the stage's dataset, camera and latents-cache overrides applied (a copy)."""
    data = copy.deepcopy(config.data)
    stage_cfg = config.stages[stage]
    with data.unlocked():
        if stage_cfg.datasets:
            data.datasets = stage_cfg.datasets
            data.weights = tuple(stage_cfg.weights)
        if stage_cfg.get("cameras"):
            data.cameras = stage_cfg.cameras
        if stage_cfg.get("latents_cache"):
            data.latents_cache = stage_cfg.latents_cache
            data.latents_cache_weights = tuple(stage_cfg.get("latents_cache_weights", ()) or ())
    return data


def actions_per_clip(data: ml_collections.ConfigDict, model: ModelConfig) -> int:
    """Actions per clip: one per frame transition, or with data.action_horizon > 0 every dataset step's, checked
    against the model's actions per latent frame (a latent frame of 4 clip frames holds 4 * frame_stride)."""
    horizon, stride = int(data.get("action_horizon", 0)), int(data.get("frame_stride", 1))
    count = num_clip_actions(int(data.num_frames), stride, horizon)
    if horizon > 0 and model.action_frames_per_latent != 4 * stride:
        raise ValueError(
            f"model.action_frames_per_latent={model.action_frames_per_latent} but data.action_horizon="
            f"{horizon} keeps every step's action at data.frame_stride={stride}: a latent frame (4 frames) "
            f"holds {4 * stride} actions; set model.action_frames_per_latent={4 * stride}"
        )
    return count


def clip_spec(data: ml_collections.ConfigDict, model: ModelConfig) -> ClipSpec:
    """What a clip of `data` holds for `model`."""
    if int(data.get("action_dim", model.action_dim)) != model.action_dim:
        raise ValueError(f"data.action_dim={data.action_dim} but model.action_dim={model.action_dim}: clips are padded "
                         f"to the model's action width; set model.action_dim (data.action_dim follows it)")
    return ClipSpec(
        data=data,
        num_frames=int(data.num_frames),
        resolution=tuple(int(r) for r in data.resolution),
        batch_size=int(data.batch_size),
        actions=actions_per_clip(data, model),
        states=clip_num_states(data),
        proprio_dim=int(data.proprio_dim),
        cameras=tuple(views_lib.camera_names(data) or ["primary"]),
        view_layout=views_lib.view_layout(data),
        views=views_lib.views_axis(data),
        latents_cache=str(data.get("latents_cache", "") or ""),
    )


def stage_spec(config: ml_collections.ConfigDict, stage: str) -> StageSpec:
    """The spec of `stage` (a key of config.stages); errors name the offending key."""
    _check_stage_name(config, stage, "stage")
    stage_cfg = config.stages[stage]
    mode = str(stage_cfg.mode)
    if mode not in MODES:
        raise ValueError(f"stages.{stage}.mode={mode!r}; expected 'video' or 'joint'")
    trainable = str(stage_cfg.trainable)
    try:
        is_trainable("", trainable)
    except ValueError:
        raise ValueError(f"stages.{stage}.trainable={trainable!r}; expected one of {TRAINABLE_CHOICES} or "
                         "'regex:...'") from None
    model = model_config_from_run(config)
    if trainable == "lora" and model.lora_rank <= 0:
        raise ValueError(f"stages.{stage}.trainable=lora but lora.rank={model.lora_rank}: set lora.rank >= 1")
    data = stage_data_config(config, stage)
    clip = clip_spec(data, model)
    vae = vae_lib.vae_config_for(config.vae.size)
    check_diffusion_config(config.diffusion)
    steps = int(stage_cfg.steps)
    lr = float(stage_cfg.learning_rate)
    warmup = int(stage_cfg.warmup_steps)
    optimizer = OptimizerSpec(
        optim=config.optim,
        learning_rate=lr if lr > 0 else float(config.optim.learning_rate),
        warmup_steps=warmup if warmup >= 0 else int(config.optim.warmup_steps),
        trainable=trainable,
    )
    video_weight = (float(config.data.video_weight) if mode == "video"
                    else float(config.data.get("action_stage_video_weight", 0.0)))
    return StageSpec(
        name=stage,
        mode=mode,
        model=model,
        clip=clip,
        optimizer=optimizer,
        clean_context_frames=int(stage_cfg.clean_context_frames),
        steps=steps if steps > 0 else int(config.train.steps),
        budget_flops=float(stage_cfg.budget_flops),
        init_from=str(stage_cfg.init_from),
        vae=vae,
        image_encoder=clip_lib.encoder_config(config) if model.image_conditioned else None,
        text_length=int(config.text.max_length),
        diffusion=config.diffusion,
        time_sampling=(time_sampling(config.diffusion, "video")[0], time_sampling(config.diffusion, "action")[0]),
        microbatches=int(config.train.microbatches),
        video_weight=video_weight,
        seed=int(config.train.seed),
        save_adapters_only=trainable == "lora" and bool(config.get("lora", {}).get("save_adapters_only", False)),
    )


def stage_specs(config: ml_collections.ConfigDict) -> tuple[StageSpec, ...]:
    """The spec of every stage the run executes, in order."""
    return tuple(stage_spec(config, name) for name in stage_list(config))


# --- The policy's side ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What a policy reads of its run: the model and the clips of the stage that trained its actions."""

    stage: str | None  # the joint stage whose data the actions trained on; None: the run's data as is
    model: ModelConfig
    clip: ClipSpec
    vae: Any
    image_encoder: clip_lib.CLIPVisionConfig | None
    text_length: int
    shift: float  # diffusion.shift of the sampler

    @property
    def data(self) -> ml_collections.ConfigDict:
        return self.clip.data

    @property
    def views(self) -> int | None:
        return self.clip.views


def policy_stage(config: ml_collections.ConfigDict) -> str | None:
    """The stage that trained the run's actions: `config.stage` when it is a joint stage, else the last joint stage
    of the run's stages (`STAGES` order first); None when the config names no joint stage."""
    stages = config.get("stages") or {}
    ordered = [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]
    joint = [s for s in ordered if str(stages[s].get("mode", "")) == "joint"]
    if not joint:
        return None
    named = str(config.get("stage", ""))
    if named in joint:
        return named
    runs = STAGES if named == "all" else tuple(ordered)
    in_run = [s for s in joint if s in runs]
    return (in_run or joint)[-1]


def policy_spec(config: ml_collections.ConfigDict) -> PolicySpec:
    """The policy's view of a run config (a checkpoint's saved config or the config being trained)."""
    model = model_config_from_run(config)
    stage = policy_stage(config)
    data = config.data if stage is None else stage_data_config(config, stage)
    return PolicySpec(
        stage=stage,
        model=model,
        clip=clip_spec(data, model),
        vae=vae_lib.vae_config_for(config.vae.size),
        image_encoder=clip_lib.encoder_config(config) if model.image_conditioned else None,
        text_length=int(config.text.max_length),
        shift=float(config.diffusion.shift),
    )
