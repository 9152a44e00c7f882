"""World-action model training config.

Usage: --config=configs/wam.py:size=tiny,stage=video_pretrain  then  --config.train.steps=50 ...
  size:  tiny | small | lab | wan1.3b | wan14b | tiny-i2v | wan14b-i2v (Wan2.1-I2V: first-frame + CLIP
         conditioning) | tiny-ti2v | wan2.2-ti2v-5b (Wan2.2-TI2V: 48 latent channels, the first latent frame
         clean); lab is the CPU model configs/lab.py trains
  stage: video_pretrain | action_tune | all (both stages back to back)
  data:  synthetic | oxe (default: oxe for tiny runs is set by the quickstart through --config.data.source)
"""

from __future__ import annotations

import ml_collections

from data_pipelines.config import get_data_config
from wamjax.eval.offline import eval_config
from wamjax.models.config import SIZES, ModelConfig
from wamjax.stages import STAGES

# The attention kernel of the full-size models: splash on TPU, cuDNN flash on GPU, blockwise elsewhere; none of
# them materializes [S, S] logits (`python -m wamjax.compile_check` shows what that buys at the published shapes).
BIG_ATTENTION = "auto"


def pinned_stage_config(arg: str | None, stage: str, **defaults: str) -> ml_collections.ConfigDict:
    """This file's config for a config file pinned to one `stage`; `defaults` fill the arguments not given."""
    args = parse_arg(arg)
    if "stage" in args:
        raise ValueError(f"stage={args['stage']!r}: this config is the {stage} stage only")
    args = {**defaults, **args, "stage": stage}
    return get_config(",".join(f"{k}={v}" for k, v in args.items()))


def parse_arg(arg: str | None) -> dict[str, str]:
    """Parses `key=value,key=value` into a dict."""
    out: dict[str, str] = {}
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"config argument {part!r} is not key=value (full argument: {arg!r})")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def model_config(size: str) -> ml_collections.ConfigDict:
    """The model block for a named size."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a known model size; known: {sorted(SIZES)}")
    values = ModelConfig.from_dict(SIZES[size]).to_dict()
    return ml_collections.ConfigDict(values)


def stage_config(name: str, tiny: bool) -> ml_collections.ConfigDict:
    """Defaults for one training stage."""
    s = ml_collections.ConfigDict()
    s.mode = "video" if name == "video_pretrain" else "joint"
    s.steps = -1  # -1: take train.steps
    s.budget_flops = 0.0  # model FLOPs this stage may spend; 0 = no budget
    s.init_from = ""  # checkpoint step dir of an earlier stage, or a diffusers Wan folder; "" = previous stage/fresh
    # "all" | "actions" | "actions+blocks" (action modules plus the transformer blocks) | "lora" (lora.* adapters and
    # the action modules) | "regex:..."
    s.trainable = "all"
    s.learning_rate = -1.0  # -1: take optim.learning_rate
    s.warmup_steps = -1  # -1: take optim.warmup_steps
    s.clean_context_frames = 0 if name == "video_pretrain" else 1  # leading latent frames given clean
    s.datasets = ""  # "": take data.datasets
    s.cameras = ""  # "": take data.cameras (e.g. "primary,wrist" for the action stage only)
    s.latents_cache = ""  # "": take data.latents_cache (e.g. action-free videos for video_pretrain only)
    s.latents_cache_weights = ()  # with latents_cache: the weights of its comma-separated caches
    s.weights = ()
    return s


def latents_cache_dir(config: ml_collections.ConfigDict) -> str:
    """The default latents cache of a full-size run: one per VAE and clip shape (relative to the working
    directory; build it once with `python -m wamjax.jobs.encode_latents`)."""
    h, w = config.data.resolution
    return f"latents/{config.vae.size}_{config.data.num_frames}x{h}x{w}"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    unknown = sorted(set(args) - {"size", "stage", "data"})
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown}; known: data, size, stage")
    size = args.get("size", "tiny")
    stage = args.get("stage", "video_pretrain")
    if stage not in (*STAGES, "all"):
        raise ValueError(f"stage={stage!r}; expected one of {(*STAGES, 'all')}")
    tiny = size in ("tiny", "small", "tiny-i2v", "tiny-ti2v", "lab")  # CPU sizes

    c = ml_collections.ConfigDict()
    c.size = size
    c.stage = stage
    c.model = model_config(size)

    c.stages = ml_collections.ConfigDict({name: stage_config(name, tiny) for name in STAGES})
    # LoRA adapters on the backbone (DreamZero's post-training): rank 0 = none. A stage with trainable=lora trains
    # only them and the action/proprio modules; the base stays frozen (no weight gradients, no optimizer state).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 0.0  # 0: the rank (scale 1)
    c.lora.targets = "q,k,v,o,ffn"  # any of q, k, v, o (self-attention), cross (text cross-attention), ffn
    # True: a trainable=lora stage's checkpoints hold the adapters, the modules trained in full and the optimizer
    # state only, not the frozen base; they are read back onto the stage's base (its init_from, or the previous
    # stage's last checkpoint, which is then always kept).
    c.lora.save_adapters_only = False
    # Written by the trainer into adapters-only checkpoints: where their base is. Not a training setting (leave
    # it empty); to read adapters onto another base, pass base= / --lora_base.
    c.lora.base = ""

    c.data = get_data_config()
    # One width for every clip's actions and the model's: each dataset's embodiment is padded to model.action_dim.
    c.data.action_dim = c.model.get_ref("action_dim")
    c.data.source = args.get("data", "synthetic" if tiny else "oxe")  # synthetic | oxe
    c.data.num_frames = 9 if tiny else 33
    c.data.resolution = (32, 32) if tiny else (480, 832)
    c.data.batch_size = 8 if tiny else 256
    c.data.synthetic_examples = 4096  # clips in the synthetic source (source=synthetic)
    c.data.latents_cache = ""  # directory from `python -m wamjax.jobs.encode_latents`; "" = encode online
    c.data.latents_cache_weights = ()  # mixture weights of several comma-separated caches; empty: equal
    c.data.video_shards = ""  # captioned-video clip shards from `python -m wamjax.jobs.ingest_video`
    c.data.video_weight = 0.0  # mixture weight of the video shards in the video_pretrain stage
    # Mixture weight of the video shards in joint (action) stages: co-training, the action loss masked per example.
    c.data.action_stage_video_weight = 0.0

    c.vae = ml_collections.ConfigDict()
    c.vae.size = "tiny" if tiny else "wan2.1"
    if c.model.in_channels == 48:  # Wan2.2-TI2V's 48 latent channels: raw 4x4 pixel patches on CPU
        c.vae.size = "pixels4" if tiny else "wan2.2"
    c.vae.weights = ""  # diffusers AutoencoderKLWan folder; "" = random init (tiny CPU runs only)
    c.vae.seed = 1234

    c.text = ml_collections.ConfigDict()
    c.text.cache = ""  # embedding cache from `python -m wamjax.jobs.text_cache`; "" = synthetic hashed embeddings
    c.text.max_length = 8 if tiny else 512

    # CLIP image encoder of the image-conditioned (I2V) sizes, run frozen in the step on each clip's first frame.
    c.image = ml_collections.ConfigDict()
    c.image.encoder = ""  # transformers CLIPVisionModel folder (Wan's image_encoder/); "" = random (CPU runs only)
    c.image.size = 32  # input pixels of the random tiny encoder (a folder's config.json sets its own)
    c.image.seed = 4321

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.time_sampling = "logit_normal"  # uniform | logit_normal | beta
    # Per-modality overrides of time_sampling ("" = take it); DreamZero-Flash: video beta, actions uniform.
    c.diffusion.video_time_sampling = ""
    c.diffusion.action_time_sampling = ""
    c.diffusion.beta_a = 3.0  # Beta(beta_a, beta_b) for "beta"; t = 1 is noise, so a > b favours high noise
    c.diffusion.beta_b = 1.0
    c.diffusion.logit_mean = 0.0
    c.diffusion.logit_std = 1.0
    c.diffusion.shift = 1.0 if tiny else 5.0
    c.diffusion.independent_action_time = True  # t_action drawn independently of t_video
    c.diffusion.text_dropout = 0.1  # probability of the null text embedding (classifier-free guidance)
    c.diffusion.video_loss_weight = 1.0
    c.diffusion.action_loss_weight = 1.0
    # Shares of the examples (joint stages) trained with the video clean (t_video = 0: inverse dynamics) or the
    # actions clean (t_action = 0: world model); the rest are joint. 0 and 0 = joint only.
    c.diffusion.clean_video_prob = 0.0
    c.diffusion.clean_action_prob = 0.0
    # Real-time chunking's training variant: a share of the examples gets its first k actions clean (t = 0, not in
    # the loss), k uniform in 1..action_prefix_max (0: all but the last), so the policy learns to continue a chunk
    # whose start was already executed (`Policy.act(action_prefix=...)`, the async closed loop).
    c.diffusion.action_prefix_prob = 0.0
    c.diffusion.action_prefix_max = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-3 if tiny else 1e-4
    c.optim.warmup_steps = 5 if tiny else 1000
    c.optim.min_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99 if tiny else 0.999
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.0  # 0 = no EMA params
    c.optim.max_consecutive_nonfinite = 5  # stop after this many non-finite steps in a row
    # Skip the update when the loss exceeds this multiple of its running mean (0 = off), the mean taken over about
    # spike_window_steps updates; counted as spike_skipped / stage_spike_skips in metrics and the FLOP report.
    c.optim.skip_step_on_spike = 0.0
    c.optim.spike_window_steps = 20

    c.train = ml_collections.ConfigDict()
    c.train.steps = 50 if tiny else 100_000
    c.train.seed = 0
    c.train.log_every = 5 if tiny else 50
    c.train.microbatches = 1  # gradient accumulation: data.batch_size in this many pieces, one optimizer step
    c.train.param_dtype = "float32"
    # JAX's persistent compilation cache: "" = WORKDIR/compilation_cache (or JAX_COMPILATION_CACHE_DIR when
    # set), "off", or a directory (gs:// too). A restart loads its executables instead of compiling them.
    c.train.compilation_cache_dir = ""
    # A file holding the compiled train step (`compile_check --save=FILE`, or written by the first start): a start
    # with the same devices, shapes and config loads it and compiles nothing; any other is refused naming the
    # difference. "" = off. With stage=all each stage needs its own: a {stage} in the name is replaced.
    c.train.compiled_step = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 25 if tiny else 1000
    c.checkpoint.keep = 3
    c.checkpoint.keep_period = 0  # also keep every keep_period-th step; 0 = off
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()
    for axis, size_ in (("data", 1), ("fsdp", -1), ("tensor", 1), ("sequence", 1)):
        c.mesh[axis] = size_
        c.mesh[f"dcn_{axis}"] = 1
    c.mesh.rules = ()  # [[logical, mesh axes], ...]; empty = wamjax.parallel.mesh.DEFAULT_RULES

    c.eval = eval_config()  # offline evaluation on held-out clips (eval.every_steps; 0 = off)

    c.flops = ml_collections.ConfigDict()
    c.flops.device_kind = ""  # override the peak-FLOP/s table lookup (e.g. "H100"); "" = detect

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = "auto"  # auto | true | false
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    if not tiny:
        # What fits at batch 1 per chip (check with `python -m wamjax.compile_check`): bfloat16 compute on float32
        # parameters sharded over every chip (mesh.fsdp=-1), each block recomputed in the backward pass, and
        # latents read from a cache: the frozen float32 VAE's first convolution alone holds ~12 GB per clip at
        # 81x480x832. `--config.data.latents_cache=` (empty) encodes in the step instead.
        c.model.dtype = "bfloat16"
        c.model.remat_policy = "full"
        c.model.attention = BIG_ATTENTION
        c.data.latents_cache = latents_cache_dir(c)
    return c
