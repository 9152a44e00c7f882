"""Export to PyTorch: diffusers backbone and the plain-PyTorch WAM against the JAX model, round trips, strict keys.

Everything runs for real: a tiny checkpoint trained in-process, safetensors files, diffusers and torch on CPU.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import torch
from checkpoint_utils import restore_state_tree
from diffusers import WanTransformer3DModel
from param_trees import backbone_params
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from data_pipelines.standardize.stats import normalize
from wamjax import config_files
from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.wan_import import WeightImportError, expected_torch_shape, import_diffusers_wan
from wamjax.checkpoint.wan_names import name_map
from wamjax.export import to_torch
from wamjax.export.torch_wam import WorldActionModel as TorchWam
from wamjax.export.torch_wam import unnormalize as torch_unnormalize
from wamjax.models import wam
from wamjax.models.config import ModelConfig, model_config_from_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32, action_dim=7, proprio_dim=5,
    max_action_tokens=16, action_frames_per_latent=2,
)
LATENT_SHAPE = (3, 4, 6, 4)  # (F, H, W, C): H != W so a transposed axis cannot pass
NUM_ACTIONS = 6
TOL = 1e-4


def _random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random WAM state dict (torch names and layouts) with every weight away from 0/1, so each one matters."""
    rng = np.random.default_rng(seed)
    shapes = {key: expected_torch_shape(cfg, key) for key, _, _, _ in name_map(cfg)}
    shapes.update({key: shape for key, _, _, shape in to_torch.action_name_map(cfg)})
    state = {}
    for key, shape in shapes.items():
        value = 0.2 * rng.standard_normal(shape)
        if key.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight", "norm_added_k.weight", "norm1.weight")):
            value += 1.0
        state[key] = value.astype(np.float32)
    return state


def _random_params(cfg: ModelConfig, seed: int = 0):
    # Built from a state dict rather than `init_params`, whose eager Flax init costs ~20 s on a busy CPU.
    return to_torch.wam_state_to_params(_random_state(cfg, seed), cfg)


# One compilation per (config, input structure); eager Flax would re-trace the scanned blocks every call.
_jitted_wam_forward = jax.jit(wam.wam_forward, static_argnums=(0,))


def _jax_forward(cfg, params, latents, t, text, actions=None, t_action=None, proprio=None, image_embeddings=None):
    """`wam_forward` with the torch reference's argument order, so one argument tuple drives both."""
    return _jitted_wam_forward(cfg, params, latents, t, text, actions=actions, t_action=t_action, proprio=proprio,
                               image_embeddings=image_embeddings)


def _inputs(cfg: ModelConfig, latent_shape=LATENT_SHAPE, num_actions=NUM_ACTIONS, text_length=7, seed=0):
    rng = np.random.default_rng(seed)
    f = latent_shape[0]
    return dict(
        latents=rng.standard_normal((2, *latent_shape)).astype(np.float32),
        t_video=np.array([40.0, 910.0], np.float32),
        t_frames=rng.uniform(0, 1000, (2, f)).astype(np.float32),
        text=rng.standard_normal((2, text_length, cfg.text_dim)).astype(np.float32),
        actions=rng.standard_normal((2, num_actions, cfg.action_dim)).astype(np.float32),
        t_action=rng.uniform(0, 1000, (2, num_actions)).astype(np.float32),
        proprio=rng.standard_normal((2, cfg.proprio_dim)).astype(np.float32),
    )


def _torch(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


def _channels_first(latents):
    return torch.from_numpy(latents).permute(0, 4, 1, 2, 3)


def _torch_wam_forward(model, latents, t, text, actions=None, t_action=None, proprio=None):
    with torch.no_grad():
        video, act = model(_channels_first(latents), _torch(t), _torch(text), _torch(actions), _torch(t_action),
                           _torch(proprio))
    return video.float().permute(0, 2, 3, 4, 1).numpy(), None if act is None else act.float().numpy()


def _load_diffusers(folder: str) -> WanTransformer3DModel:
    """The diffusers model of an exported folder, loaded strictly.

    `from_pretrained` is used when `accelerate` is installed: diffusers 0.42 refuses to load Wan's
    fp32-kept modules without it. Otherwise the same config and every shard of the index go through
    `from_config` + `load_state_dict(strict=True)`, which checks the same key set.
    """
    if importlib.util.find_spec("accelerate") is not None:
        model, info = WanTransformer3DModel.from_pretrained(folder, output_loading_info=True)
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
        return model.eval()
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    index = os.path.join(folder, to_torch.DIFFUSERS_INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [to_torch.DIFFUSERS_WEIGHTS_NAME]
    state = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return model.eval()


@pytest.fixture(scope="module", params=["bidirectional", "chunk_causal"])
def exported(request, tmp_path_factory):
    """(cfg, params, out_dir) of random tiny params exported in float32, diffusers weights sharded."""
    cfg = ModelConfig.from_dict({**TINY, "attention_layout": request.param})
    params = _random_params(cfg)
    out = str(tmp_path_factory.mktemp(f"export_{request.param}"))
    to_torch.write_wam(out, cfg, params, "float32")
    to_torch.write_diffusers_transformer(os.path.join(out, "transformer"), cfg, params, "float32", 20_000)
    return cfg, params, out


# --- Import without JAX ------------------------------------------------------------------------------------

def test_torch_wam_imports_without_jax():
    code = (
        "import sys, importlib.util\n"
        "sys.modules['jax'] = None; sys.modules['flax'] = None\n"
        "import wamjax.export.torch_wam as m\n"
        "assert 'jax' not in [k for k, v in sys.modules.items() if v is not None]\n"
        f"spec = importlib.util.spec_from_file_location('standalone', {m_path()!r})\n"
        "s = sys.modules['standalone'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(s)\n"
        "print(m.WorldActionModel.__name__, s.WorldActionModel.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["WorldActionModel", "WorldActionModel"]


def m_path() -> str:
    return os.path.join(REPO, "wamjax", "export", "torch_wam.py")


# --- Parity with the JAX model -----------------------------------------------------------------------------

# ModelConfig fields that change how the model runs, not what it computes, or only how it trains: the
# PyTorch reference has no counterpart for them. A new ModelConfig field must land here or in WamConfig.
EXECUTION_FIELDS = {"history", "attention", "attention_block_q", "attention_block_kv", "scan_layers",
                    "remat_policy", "dtype"}
# LoRA adapters are merged into the weights the reference loads (to_torch writes lora_rank=0 into wam_config.json).
MERGED_FIELDS = {"lora_rank", "lora_alpha", "lora_targets"}


def test_torch_reference_config_keeps_step_with_model_config():
    """Every architecture field of ModelConfig is a WamConfig field with the same default, and nothing else is."""
    import dataclasses

    from wamjax.export.torch_wam import WamConfig

    jax_fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    torch_fields = {f.name: f.default for f in dataclasses.fields(WamConfig)}
    assert EXECUTION_FIELDS <= set(jax_fields), EXECUTION_FIELDS - set(jax_fields)
    architecture = {k: v for k, v in jax_fields.items() if k not in EXECUTION_FIELDS | MERGED_FIELDS}
    assert set(torch_fields) == set(architecture), (
        f"only in ModelConfig: {sorted(set(architecture) - set(torch_fields))}; "
        f"only in WamConfig: {sorted(set(torch_fields) - set(architecture))}")
    assert {k: torch_fields[k] for k in architecture} == architecture
    # A run's model config round-trips into the reference's.
    cfg = model_config_from_run(config_files.get_config("configs/wam.py:size=tiny"))
    assert WamConfig.from_dict(dataclasses.asdict(cfg)) == WamConfig(
        **{k: getattr(cfg, k) for k in torch_fields})


def test_name_maps_cover_the_model_params():
    cfg = ModelConfig.from_dict(TINY)
    fresh = jax.eval_shape(lambda: wam.init_params(cfg, jax.random.key(0), LATENT_SHAPE, 7, NUM_ACTIONS))
    ours = _random_params(cfg)
    assert jax.tree.structure(ours) == jax.tree.structure(fresh)
    assert [a.shape for a in jax.tree.leaves(ours)] == [a.shape for a in jax.tree.leaves(fresh)]
    state = to_torch.params_to_wam_state(cfg, ours)
    assert state["actions.action_decoder.weight"].shape == (cfg.action_dim, cfg.dim)
    assert sum(v.size for v in state.values()) == sum(a.size for a in jax.tree.leaves(fresh))


@pytest.mark.parametrize("exported", ["bidirectional"], indirect=True)  # diffusers' Wan is bidirectional
def test_diffusers_backbone_matches_jax_video(exported):
    cfg, params, out = exported
    folder = os.path.join(out, "transformer")
    assert os.path.exists(os.path.join(folder, to_torch.DIFFUSERS_INDEX_NAME))  # 20 kB limit: sharded
    model = _load_diffusers(folder)
    x = _inputs(cfg)
    ref = np.asarray(_jax_forward(cfg, params, x["latents"], x["t_video"], x["text"]).video)
    with torch.no_grad():
        out_video = model(_channels_first(x["latents"]), _torch(x["t_video"]), _torch(x["text"]), return_dict=False)[0]
    assert np.abs(out_video.permute(0, 2, 3, 4, 1).numpy() - ref).max() < TOL


@pytest.mark.parametrize("mode", ["video", "video_per_frame", "joint", "joint_no_proprio"])
def test_torch_wam_matches_jax(exported, mode):
    cfg, params, out = exported
    model = TorchWam.from_pretrained(out)
    assert model.cfg.attention_layout == cfg.attention_layout
    x = _inputs(cfg)
    t = x["t_frames"] if mode == "video_per_frame" else x["t_video"]
    args = (x["latents"], t, x["text"])
    if mode.startswith("joint"):
        proprio = None if mode == "joint_no_proprio" else x["proprio"]
        args = (*args, x["actions"], x["t_action"], proprio)
    ref = _jax_forward(cfg, params, *args)
    video, actions = _torch_wam_forward(model, *args)
    assert video.shape == ref.video.shape
    assert np.abs(video - np.asarray(ref.video)).max() < TOL
    if mode.startswith("joint"):
        assert actions.shape == ref.actions.shape
        assert np.abs(actions - np.asarray(ref.actions)).max() < TOL
    else:
        assert actions is None


@pytest.mark.parametrize("exported", ["chunk_causal"], indirect=True)
def test_torch_wam_chunk_causal_future_does_not_change_past(exported):
    cfg, params, out = exported
    model = TorchWam.from_pretrained(out)
    x = _inputs(cfg)
    args = (x["latents"], x["t_frames"], x["text"], x["actions"], x["t_action"], x["proprio"])
    video, actions = _torch_wam_forward(model, *args)
    changed = x["latents"].copy()
    changed[:, -1] += 5.0  # the last latent frame is the last chunk
    video2, actions2 = _torch_wam_forward(model, changed, *args[1:])
    assert np.abs(video2[:, :-1] - video[:, :-1]).max() < 1e-5
    assert np.abs(video2[:, -1] - video[:, -1]).max() > 1e-3
    # Actions 0..1 lead to frame 1 (chunk 1): they cannot see frame 2.
    assert np.abs(actions2[:, :2] - actions[:, :2]).max() < 1e-5
    # One state per chunk: the reference equals JAX, and chunk 2's state moves chunk 2 only.
    states = np.random.default_rng(5).standard_normal((2, LATENT_SHAPE[0], cfg.proprio_dim)).astype(np.float32)
    per_chunk = (*args[:5], states)
    ref = _jax_forward(cfg, params, *per_chunk)
    video, actions = _torch_wam_forward(model, *per_chunk)
    assert np.abs(video - np.asarray(ref.video)).max() < TOL
    assert np.abs(actions - np.asarray(ref.actions)).max() < TOL
    moved = states.copy()
    moved[:, 2] += 3.0
    video2, _ = _torch_wam_forward(model, *per_chunk[:5], moved)
    assert np.abs(video2[:, :2] - video[:, :2]).max() < 1e-5 and np.abs(video2[:, 2] - video[:, 2]).max() > 1e-3


# --- Image-to-video (Wan2.1-I2V) backbone -------------------------------------------------------------------

TINY_I2V = {**TINY, "in_channels": 12, "image_dim": 8, "added_kv_proj_dim": 24}
I2V_LATENT_SHAPE = (3, 4, 6, 12)  # noisy latents + 4 mask channels + conditioning latents
DIFFUSERS_TEXT_LENGTH = 512  # diffusers' attention processor assumes Wan's 512 text tokens before the image ones


@pytest.fixture(scope="module")
def exported_i2v(tmp_path_factory):
    """(cfg, params, out_dir, inputs) of a random tiny I2V WAM exported in float32."""
    cfg = ModelConfig.from_dict(TINY_I2V)
    params = _random_params(cfg)
    out = str(tmp_path_factory.mktemp("export_i2v"))
    to_torch.write_wam(out, cfg, params, "float32")
    to_torch.write_diffusers_transformer(os.path.join(out, "transformer"), cfg, params, "float32")
    x = _inputs(cfg, latent_shape=I2V_LATENT_SHAPE, text_length=DIFFUSERS_TEXT_LENGTH)
    x["image"] = np.random.default_rng(3).standard_normal((2, 5, cfg.image_dim)).astype(np.float32)
    return cfg, params, out, x


def test_i2v_export_loads_in_diffusers_and_matches_jax(exported_i2v):
    cfg, params, out, x = exported_i2v
    model = _load_diffusers(os.path.join(out, "transformer"))  # no missing or unexpected keys
    assert model.config.image_dim == 8 and model.config.added_kv_proj_dim == 24 and model.config.in_channels == 12
    ref = _jax_forward(cfg, params, x["latents"], x["t_video"], x["text"], image_embeddings=x["image"])
    ref = np.asarray(ref.video)
    with torch.no_grad():
        video = model(_channels_first(x["latents"]), _torch(x["t_video"]), _torch(x["text"]),
                      encoder_hidden_states_image=_torch(x["image"]), return_dict=False)[0]
    assert video.shape == (2, 4, 3, 4, 6)
    assert np.abs(video.permute(0, 2, 3, 4, 1).numpy() - ref).max() < TOL


def test_i2v_round_trip_gives_identical_params(exported_i2v):
    cfg, params, out, _ = exported_i2v
    cfg2, params2 = to_torch.import_wam(out)
    assert cfg2 == cfg
    _, backbone = import_diffusers_wan(os.path.join(out, "transformer"))
    for back in (params2, backbone):
        want = params if back is params2 else backbone_params(params)
        assert jax.tree.structure(back) == jax.tree.structure(want)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(back), strict=True))


@pytest.mark.parametrize("mode", ["video", "joint"])
def test_torch_wam_i2v_matches_jax(exported_i2v, mode):
    cfg, params, out, x = exported_i2v
    model = TorchWam.from_pretrained(out)
    args = (x["latents"], x["t_frames"], x["text"])
    if mode == "joint":
        args = (*args, x["actions"], x["t_action"], x["proprio"])
    ref = _jax_forward(cfg, params, *args, image_embeddings=x["image"])
    with torch.no_grad():
        video, actions = model(_channels_first(x["latents"]), *(_torch(a) for a in args[1:]), image=_torch(x["image"]))
    assert np.abs(video.permute(0, 2, 3, 4, 1).numpy() - np.asarray(ref.video)).max() < TOL
    if mode == "joint":
        assert np.abs(actions.numpy() - np.asarray(ref.actions)).max() < TOL
    with pytest.raises(ValueError, match="image_dim=8"):
        model(_channels_first(x["latents"]), *(_torch(a) for a in args[1:]))


# --- Round trip and strict keys ----------------------------------------------------------------------------

def test_round_trip_gives_identical_params(exported):
    cfg, params, out = exported
    cfg2, params2 = to_torch.import_wam(out)
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # The diffusers folder (sharded) gives back the backbone exactly.
    _, backbone = import_diffusers_wan(os.path.join(out, "transformer"), cfg)
    assert jax.tree.structure(backbone) == jax.tree.structure(backbone_params(params))
    for a, b in zip(jax.tree.leaves(backbone_params(params)), jax.tree.leaves(backbone), strict=True):
        assert np.array_equal(a, b)


def test_unscanned_params_export_to_the_same_state():
    cfg = ModelConfig.from_dict(TINY)
    params = _random_params(cfg)
    unscanned_cfg = ModelConfig.from_dict({**TINY, "scan_layers": False})
    state = to_torch.params_to_wam_state(cfg, params)
    unscanned = to_torch.wam_state_to_params(state, unscanned_cfg)
    assert "layers_1" in unscanned["blocks"]
    state2 = to_torch.params_to_wam_state(unscanned_cfg, unscanned)
    assert sorted(state) == sorted(state2)
    assert all(np.array_equal(state[k], state2[k]) for k in state)


def _rewrite(out: str, tmp_path, edit) -> str:
    target = str(tmp_path / "edited")
    os.makedirs(target, exist_ok=True)
    state = load_file(os.path.join(out, to_torch.WAM_WEIGHTS_NAME))
    edit(state)
    save_file(state, os.path.join(target, to_torch.WAM_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out, to_torch.WAM_CONFIG_NAME)) as f, \
            open(os.path.join(target, to_torch.WAM_CONFIG_NAME), "w") as g:
        g.write(f.read())
    return target


@pytest.mark.parametrize(
    "key, edit, pattern",
    [
        ("blocks.1.attn2.to_v.bias", "drop", "missing key 'blocks.1.attn2.to_v.bias'"),
        ("actions.proprio_encoder.linear_2.weight", "drop", "missing key 'actions.proprio_encoder.linear_2.weight'"),
        ("actions.surprise", "add", "unexpected key 'actions.surprise'"),
        ("blocks.0.surprise.weight", "add", "unexpected key 'blocks.0.surprise.weight'"),
        ("actions.type_embedding", "shape", "key 'actions.type_embedding' has shape"),
    ],
)
def test_wrong_or_missing_key_fails_naming_it(exported, tmp_path, key, edit, pattern):
    _, _, out = exported

    def apply(state):
        if edit == "drop":
            del state[key]
        elif edit == "add":
            state[key] = np.zeros(3, np.float32)
        else:
            state[key] = np.zeros((3, 5), np.float32)

    target = _rewrite(out, tmp_path, apply)
    with pytest.raises(WeightImportError, match=pattern):
        to_torch.import_wam(target)
    with pytest.raises((KeyError, ValueError), match=key.replace(".", r"\.")):
        TorchWam.from_pretrained(target)


def test_param_tree_with_missing_or_extra_leaf_fails_naming_it():
    cfg = ModelConfig.from_dict(TINY)
    params = _random_params(cfg)
    missing = jax.tree.map(lambda x: x, params)
    del missing["blocks"]["layers"]["block"]["attn1"]["norm_k"]
    with pytest.raises(WeightImportError, match="blocks/layers/block/attn1/norm_k"):
        to_torch.params_to_diffusers_state(cfg, missing)
    extra = jax.tree.map(lambda x: x, params)
    extra["blocks"]["layers"]["block"]["attn1"]["surprise"] = np.zeros(3)
    with pytest.raises(WeightImportError, match="blocks/layers/block/attn1/surprise"):
        to_torch.params_to_diffusers_state(cfg, extra)
    extra_action = jax.tree.map(lambda x: x, params)
    extra_action["actions"]["surprise"] = np.zeros(3)
    with pytest.raises(WeightImportError, match="actions/surprise"):
        to_torch.params_to_wam_state(cfg, extra_action)


# --- bfloat16 ----------------------------------------------------------------------------------------------

def test_bfloat16_export(tmp_path):
    cfg = ModelConfig.from_dict(TINY)
    params = _random_params(cfg)
    out = str(tmp_path / "bf16")
    to_torch.write_wam(out, cfg, params, "bfloat16")
    to_torch.write_diffusers_transformer(os.path.join(out, "transformer"), cfg, params, "bfloat16")
    diffusers_weights = os.path.join(out, "transformer", to_torch.DIFFUSERS_WEIGHTS_NAME)
    for path in (os.path.join(out, "wam.safetensors"), diffusers_weights):
        with safe_open(path, framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    _, params_bf16 = to_torch.import_wam(out, dtype=ml_dtypes.bfloat16)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_bf16), strict=True):
        assert np.array_equal(a.astype(ml_dtypes.bfloat16), b)

    model = TorchWam.from_pretrained(out)
    assert model.proj_out.weight.dtype == torch.bfloat16
    x = _inputs(cfg)
    args = (x["latents"], x["t_frames"], x["text"], x["actions"], x["t_action"], x["proprio"])
    ref = _jax_forward(cfg, params, *args)
    video, actions = _torch_wam_forward(model, *args)
    scale = np.abs(np.asarray(ref.video)).max()
    assert np.abs(video - np.asarray(ref.video)).max() < 0.05 * scale
    assert np.abs(actions - np.asarray(ref.actions)).max() < 0.05 * np.abs(np.asarray(ref.actions)).max()
    assert TorchWam.from_pretrained(out, dtype=torch.float32).proj_out.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="float16"):
        to_torch.write_wam(str(tmp_path / "fp16"), cfg, params, "float16")


def test_video_only_params_export_and_load(tmp_path):
    cfg = ModelConfig.from_dict(TINY)
    backbone = backbone_params(_random_params(cfg))
    out = str(tmp_path / "video")
    to_torch.write_wam(out, cfg, backbone)
    _, back = to_torch.import_wam(out)
    assert "actions" not in back
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves(back), strict=True))
    model = TorchWam.from_pretrained(out)
    assert model.actions is None
    x = _inputs(cfg)
    with pytest.raises(ValueError, match="video backbone only"):
        _torch_wam_forward(model, x["latents"], x["t_video"], x["text"], x["actions"], x["t_action"])


@pytest.mark.parametrize("method", ["bounds", "normal"])
def test_unnormalize_inverts_the_data_pipeline_normalization(method):
    rng = np.random.default_rng(0)
    values = rng.uniform(-2.0, 3.0, (50, 7))
    stats = {
        "mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
        "q01": np.quantile(values, 0.01, 0).tolist(), "q99": np.quantile(values, 0.99, 0).tolist(),
        "mask": [True] * 6 + [False],  # the gripper stays as it is
    }
    inside = np.clip(values, stats["q01"], stats["q99"])  # "bounds" clips outside [q01, q99]
    normalized = normalize(inside, stats, method)
    restored = torch_unnormalize(torch.from_numpy(normalized), stats, method).numpy()
    assert np.abs(restored - inside).max() < 1e-5
    assert np.array_equal(restored[:, 6], normalized[:, 6])
    with pytest.raises(ValueError, match="stats 'mask' have 7 values; the input has 3 dimensions"):
        torch_unnormalize(torch.zeros(2, 3), stats, method)


def test_parse_size():
    assert to_torch.parse_size("10GB") == 10 * 1000**3
    assert to_torch.parse_size("5GiB") == 5 * 1024**3
    assert to_torch.parse_size("20KB") == 20_000
    assert to_torch.parse_size("123") == 123
    with pytest.raises(ValueError, match="max_shard_size='ten'"):
        to_torch.parse_size("ten")


# --- From a real training checkpoint -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny action_tune checkpoint with EMA params, trained 2 steps in-process on synthetic data."""
    from wamjax.train.loop import train

    config = config_files.get_config(f"{os.path.join(REPO, 'configs', 'wam.py')}:size=tiny,stage=action_tune")
    config.train.steps = 2
    config.checkpoint.async_save = False
    config.data.batch_size = 8  # divisible by the 8 simulated devices of the fsdp axis
    config.optim.ema_decay = 0.5
    workdir = str(tmp_path_factory.mktemp("run"))
    train(config, workdir)
    step_dir = os.path.join(workdir, "checkpoints", "2")
    assert os.path.isdir(os.path.join(step_dir, "state"))
    return step_dir


def test_export_checkpoint_cli_ema_and_parity(checkpoint, tmp_path):
    out = str(tmp_path / "out")
    result = subprocess.run(
        [sys.executable, "-m", "wamjax.export.to_torch", f"--checkpoint={checkpoint}", f"--out={out}",
         "--max_shard_size=200KB"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["ema"] is True
    assert os.path.exists(os.path.join(out, "transformer", to_torch.DIFFUSERS_INDEX_NAME))
    with open(os.path.join(out, "norm_stats.json")) as f:
        assert json.load(f) == ckpt.read_json_item(checkpoint, "norm_stats")
    with open(os.path.join(out, "wam_config.json")) as f:
        wam_config = json.load(f)
    assert wam_config["step"] == 2 and wam_config["ema"] is True and wam_config["dtype"] == "float32"

    state = restore_state_tree(checkpoint)
    ema, raw = (jax.tree.map(np.asarray, state[k]) for k in ("ema_params", "params"))
    cfg, exported = to_torch.import_wam(out)
    assert cfg == model_config_from_run(ml_collections.ConfigDict(ckpt.read_json_item(checkpoint, "config")))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(exported), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(ema), strict=True))

    out_raw = str(tmp_path / "raw")
    summary_raw = to_torch.export_checkpoint(os.path.dirname(checkpoint), out_raw, use_ema=False)
    assert summary_raw["ema"] is False and summary_raw["step_dir"] == checkpoint
    _, exported_raw = to_torch.import_wam(out_raw)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(exported_raw), strict=True))

    # The exported checkpoint runs the same in diffusers, torch_wam and JAX (shapes of the training run).
    x = _inputs(cfg, latent_shape=(3, 4, 4, cfg.in_channels), num_actions=8, text_length=8)
    args = (x["latents"], x["t_frames"], x["text"], x["actions"], x["t_action"], x["proprio"])
    ref = _jax_forward(cfg, ema, *args)
    video, actions = _torch_wam_forward(TorchWam.from_pretrained(out), *args)
    assert np.abs(video - np.asarray(ref.video)).max() < TOL
    assert np.abs(actions - np.asarray(ref.actions)).max() < TOL
    ref_video = np.asarray(_jax_forward(cfg, ema, x["latents"], x["t_video"], x["text"]).video)
    with torch.no_grad():
        dv = _load_diffusers(os.path.join(out, "transformer"))(
            _channels_first(x["latents"]), _torch(x["t_video"]), _torch(x["text"]), return_dict=False
        )[0]
    assert np.abs(dv.permute(0, 2, 3, 4, 1).numpy() - ref_video).max() < TOL


def test_export_of_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        to_torch.export_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def _bytes_read() -> int:
    import tensorstore as ts

    return sum(int(v.get("value", 0)) for m in ts.experimental_collect_matching_metrics(
        "/tensorstore/kvstore/file/bytes_read") for v in m["values"])


def test_export_and_policy_read_the_parameters_only(checkpoint, tmp_path):
    """load_checkpoint, the exporter and Policy.from_checkpoint read one copy of the weights from disk, not the
    Adam moments or the other copy: a full state restore reads about four times as much."""
    from wamjax.checkpoint.load import load_checkpoint
    from wamjax.inference import Policy

    full = restore_state_tree(checkpoint)
    params_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(full["params"]))
    opt_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(full["opt_state"]))
    assert opt_bytes >= 2 * params_bytes  # Adam's two moments

    def read_by(fn):
        before = _bytes_read()
        result = fn()
        return _bytes_read() - before, result

    # Every restore reads the tree's metadata (sizes with the number of leaves, not their bytes) first.
    metadata_read, _ = read_by(lambda: ckpt.saved_state_tree(checkpoint))
    full_read, _ = read_by(lambda: restore_state_tree(checkpoint))
    assert full_read - metadata_read > 3 * params_bytes  # params, EMA copy and two moments
    limit = metadata_read + 1.5 * params_bytes  # one copy (plus OCDBT nodes), so neither moments nor the other copy
    read, (_, params) = read_by(lambda: load_checkpoint(checkpoint))
    assert read < limit, (read, params_bytes)
    assert all(np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(full["ema_params"]), strict=True))
    read, _ = read_by(lambda: to_torch.export_checkpoint(checkpoint, str(tmp_path / "out")))
    assert read < limit, (read, params_bytes)
    read, policy = read_by(lambda: Policy.from_checkpoint(checkpoint))
    assert read < limit, (read, params_bytes)
    leaf = jax.tree.leaves(policy.params)[0]
    assert isinstance(leaf, jax.Array) and leaf.sharding.device_set == {jax.local_devices()[0]}


@pytest.mark.parametrize("exported", ["bidirectional"], indirect=True)
def test_torch_wam_sampling_modes_match_jax(exported):
    """torch_wam.sample runs the three ways to act with the JAX sampler's numbers."""
    from wamjax.diffusion.sampler import SamplerOptions, sample
    from wamjax.export.torch_wam import sample as torch_sample
    from wamjax.inference.policy_step import imagine_then_act

    cfg, params, out = exported
    model = TorchWam.from_pretrained(out)
    x = _inputs(cfg, seed=1)
    noise = _inputs(cfg, seed=2)
    context, future, text, proprio = x["latents"][:, :1], noise["latents"][:, 1:], x["text"], x["proprio"]
    options = SamplerOptions(num_steps=3, action_steps=2, shift=2.0)
    jax_out = {
        "joint": sample(cfg, params, context, text, proprio, future, noise["actions"], options=options),
        "imagine_then_act": imagine_then_act(cfg, params, context, text, proprio, future, noise["actions"], options),
        "world_model": sample(cfg, params, context, text, proprio, future, None, options=options,
                              clean_actions=x["actions"]),
    }
    for mode, ref in jax_out.items():
        video, actions = torch_sample(model, _channels_first(context), _torch(text), _torch(proprio),
                                      _channels_first(np.ascontiguousarray(future)), _torch(noise["actions"]),
                                      mode=mode, num_steps=3, action_steps=2, shift=2.0, actions=_torch(x["actions"]))
        assert np.abs(video.permute(0, 2, 3, 4, 1).numpy() - np.asarray(ref.latents)).max() < TOL, mode
        assert np.abs(actions.numpy() - np.asarray(ref.actions)).max() < TOL, mode
