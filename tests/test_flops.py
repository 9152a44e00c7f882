"""FLOP accounting: analytic vs XLA, the ledger across resumes, budgets, and the estimate/report CLIs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from wamjax import config_files
from wamjax.flops import analytic, encoders, ledger, peak, report, stage, xla
from wamjax.flops.ledger import FlopLedger, format_flops, stage_step_count, steps_for_budget
from wamjax.models import vae as vae_lib
from wamjax.models.config import PUBLISHED_PARAM_COUNTS, SIZES, ModelConfig
from wamjax.stages import stage_spec

S = analytic.SequenceShape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name: str, arg: str):
    return config_files.load_config_module(os.path.join(REPO, "configs", f"{name}.py")).get_config(arg)


def _model(size: str, **overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_dict(SIZES[size]), **overrides)


def _run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one host device is enough to compile a forward
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


# ----------------------------------------------------------------------------------------------------
# Analytic counts against XLA's cost analysis.
# ----------------------------------------------------------------------------------------------------

XLA_CASES = [
    # size, mode, frames, resolution, text, batch, layout, pad_to_multiple; chunk_causal trains teacher-forced
    # (the clean history copy in the sequence) unless the layout says diffusion_forcing
    ("tiny", "video", 9, (32, 32), 8, 1, "bidirectional", 1),
    ("tiny", "joint", 9, (32, 32), 8, 2, "bidirectional", 1),
    ("tiny", "joint", 9, (32, 48), 8, 2, "chunk_causal/diffusion_forcing", 1),
    ("tiny", "joint", 13, (32, 32), 8, 1, "chunk_causal", 8),
    ("small", "video", 5, (64, 32), 16, 1, "chunk_causal", 1),
    ("small", "joint", 13, (32, 64), 16, 2, "bidirectional", 1),
]


@pytest.mark.parametrize("size,mode,frames,resolution,text,batch,layout,pad", XLA_CASES)
def test_analytic_forward_matches_xla_within_3_percent(
    size, mode, frames, resolution, text, batch, layout, pad
):
    layout, _, history = layout.partition("/")
    cfg = _model(size, attention_layout=layout, history=history or "teacher_forcing")
    shape = analytic.SequenceShape(mode=mode, num_frames=frames, resolution=resolution, text_length=text,
                                   pad_to_multiple=pad)
    # XLA counts what the compiled dot_product kernel computes: the hardware count of that kernel.
    counted = analytic.forward_flops(cfg, shape, batch=batch, kernel="dot_product")
    model = analytic.forward_flops(cfg, shape, batch=batch)
    tok = analytic.token_counts(cfg, shape)  # per sample
    # 13 frames are 4 latent frames: chunks 1 and 2 have a clean copy (frames and their 8 actions).
    if layout == "chunk_causal" and not history and frames == 13:
        assert (tok.history_video, tok.history_action) == (2 * tok.video // 4, 8 * (mode == "joint"))
    compiled = xla.xla_forward_flops(cfg, shape, batch=batch)
    assert counted["total"] == pytest.approx(compiled, rel=0.03), (counted, compiled)
    assert counted["total"] == pytest.approx(sum(v for k, v in counted.items() if k != "total"))
    if layout == "bidirectional" and pad == 1:
        assert model == counted  # nothing masked: model = hardware = the dense count, exactly
    else:
        assert model["self_attention_scores"] < counted["self_attention_scores"]
        assert {k: v for k, v in model.items() if k not in ("self_attention_scores", "total")} == {
            k: v for k, v in counted.items() if k not in ("self_attention_scores", "total")}


def test_analytic_i2v_forward_matches_xla_within_3_percent():
    cfg = ModelConfig.from_dict(SIZES["tiny-i2v"])
    shape = analytic.SequenceShape(mode="joint", num_frames=9, resolution=(32, 32), text_length=8, image_tokens=17)
    counted = analytic.forward_flops(cfg, shape, batch=2, kernel="dot_product")
    assert counted["total"] == pytest.approx(xla.xla_forward_flops(cfg, shape, batch=2), rel=0.03)
    assert counted == analytic.forward_flops(cfg, shape, batch=2)  # bidirectional, unpadded: model = hardware
    without_image = analytic.forward_flops(dataclasses.replace(cfg, image_dim=None, added_kv_proj_dim=None),
                                           shape, batch=2)
    assert counted["cross_attention_scores"] > without_image["cross_attention_scores"]


def test_xla_layer_extrapolation_equals_unrolled_compile():
    cfg = _model("small", scan_layers=False)  # 4 layers, compiled unrolled in one piece
    tok = analytic.token_counts(cfg, S(mode="joint", num_frames=5, resolution=(32, 32), text_length=8))
    whole = xla.compiled_forward_flops(cfg, (*tok.latent_shape, cfg.in_channels), 8, tok.action, batch=1)
    extrapolated = xla.xla_forward_flops(cfg, S(mode="joint", num_frames=5, resolution=(32, 32), text_length=8))
    assert extrapolated == pytest.approx(whole, rel=1e-6)


def test_xla_refuses_models_over_the_parameter_limit():
    cfg = _model("small")
    with pytest.raises(ValueError, match="--xla refused.*GiB"):
        xla.xla_forward_flops(cfg, S(mode="video", num_frames=5, resolution=(32, 32), text_length=8),
                              max_param_bytes=1024)


def test_vae_encoder_flops_match_xla():
    vae_cfg = vae_lib.vae_config_for("tiny")
    params = jax.eval_shape(lambda: vae_lib.init_vae_params(vae_cfg, jax.random.key(0)))
    video = jax.ShapeDtypeStruct((1, 9, 32, 48, 3), jnp.float32)
    compiled = vae_lib.vae_encode.lower(vae_cfg, params, video).compile().cost_analysis()["flops"]
    # Norms and activations are left out of the analytic VAE count: a few percent at this size.
    assert encoders.vae_encode_flops(vae_cfg, 9, (32, 48)) == pytest.approx(compiled, rel=0.03)


# ----------------------------------------------------------------------------------------------------
# Analytic structure.
# ----------------------------------------------------------------------------------------------------


def test_token_counts_follow_the_documented_layout():
    cfg = _model("wan14b")
    tok = analytic.token_counts(cfg, S(mode="joint", num_frames=33, resolution=(480, 832), text_length=512))
    assert tok.latent_shape == (9, 60, 104)
    assert (tok.video, tok.action, tok.proprio, tok.text) == (9 * 30 * 52, 32, 1, 512)
    assert tok.sequence == 9 * 30 * 52 + 33
    per_chunk = analytic.token_counts(cfg, S(mode="joint", num_frames=33, resolution=(480, 832), text_length=512,
                                             num_proprio=5))
    assert per_chunk.proprio == 5 and per_chunk.sequence == tok.sequence + 4
    flops = {n: analytic.forward_flops(cfg, S(mode="joint", num_frames=9, resolution=(32, 32), text_length=8,
                                              num_proprio=n))["action_encoders"] for n in (1, 3)}
    assert flops[3] > flops[1]
    video = analytic.token_counts(cfg, S(mode="video", num_frames=33, resolution=(480, 832), text_length=512))
    assert (video.action, video.proprio) == (0, 0)
    padded = analytic.token_counts(cfg, S(mode="joint", num_frames=9, resolution=(32, 32), text_length=8,
                                          pad_to_multiple=8))
    assert padded.sequence % 8 == 0 and padded.padding == (-(12 + 8 + 1)) % 8
    with pytest.raises(ValueError, match="num_frames=8"):
        analytic.token_counts(cfg, S(mode="video", num_frames=8, resolution=(32, 32), text_length=8))
    with pytest.raises(ValueError, match="mode='idm'"):
        analytic.token_counts(cfg, S(mode="idm", num_frames=9, resolution=(32, 32), text_length=8))


def test_matmul_components_match_hand_counts_and_scale_with_batch():
    cfg = _model("wan14b")
    one = analytic.forward_flops(cfg, S(mode="video", num_frames=81, resolution=(480, 832), text_length=512))
    s, d, layers = 32760, 5120, 40
    assert one["self_attention_projections"] == layers * 4 * (2 * s * d * d + s * d)
    assert one["ffn"] == pytest.approx(layers * (4 * s * d * 13824 + s * 13824 + s * d + 8 * s * 13824))
    # QK^T and AV dominate the scores component; softmax adds 5 per score.
    assert one["self_attention_scores"] == layers * (4 * s * s * d + 5 * 40 * s * s)
    assert one["patch_embedding"] == 2 * s * 64 * d + s * d
    assert one["action_encoders"] == one["action_decoder"] == 0
    four = analytic.forward_flops(cfg, S(mode="video", num_frames=81, resolution=(480, 832), text_length=512), batch=4)
    assert four["total"] == pytest.approx(4 * one["total"])


def test_chunk_causal_dense_kernel_computes_every_score_and_the_model_counts_the_visible_ones():
    kwargs = dict(mode="joint", num_frames=33, resolution=(96, 96), text_length=16)
    bi = analytic.forward_flops(_model("small"), S(**kwargs))
    causal_cfg = _model("small", attention_layout="chunk_causal", history="diffusion_forcing")
    dense = analytic.forward_flops(causal_cfg, S(**kwargs), kernel="dot_product")
    # A dense kernel computes every score and adds one select per score for the mask; nothing is halved.
    s = analytic.token_counts(_model("small"), S(**kwargs)).sequence
    assert dense["self_attention_scores"] - bi["self_attention_scores"] == 4 * 4 * s * s
    # The model counts the pairs the mask shows: chunk-causal, a little over half.
    model = analytic.forward_flops(causal_cfg, S(**kwargs))
    assert 0.5 < model["self_attention_scores"] / dense["self_attention_scores"] < 0.7


def test_train_step_flops_is_three_forwards_plus_frozen_and_remat():
    config = _load_config("wam", "size=tiny,stage=action_tune")
    step = stage.train_step_flops(stage_spec(config, "action_tune"))
    batch = config.data.batch_size
    assert step.train_per_step == pytest.approx(3 * step.forward_per_sample * batch)
    assert step.hardware_per_step == step.train_per_step == step.dense_per_step  # dot_product, no remat, no mask
    assert step.attention_kernel == "dot_product" and step.attention.visible_fraction == 1.0
    assert step.forward_per_sample == pytest.approx(sum(step.components.values()))
    assert (step.video_tokens, step.action_tokens, step.text_tokens) == (12, 8, 8)
    assert step.frozen_components["vae_encoder"] > 0 and step.frozen_components["text_encoder"] == 0

    config.model.remat_policy = "full"
    config.data.latents_cache = "/cache"
    remat = stage.train_step_flops(stage_spec(config, "action_tune"))
    recompute = analytic.block_forward_flops(remat.components) * batch
    assert remat.hardware_per_step == pytest.approx(remat.train_per_step + recompute)
    assert remat.train_per_step == step.train_per_step  # model FLOPs exclude recompute
    assert remat.frozen_per_step == 0.0

    video = stage.train_step_flops(stage_spec(config, "video_pretrain"))
    assert video.action_tokens == 0 and video.forward_per_sample < step.forward_per_sample
    with pytest.raises(KeyError, match="'finetune'"):
        stage.train_step_flops(stage_spec(config, "finetune"))


# ----------------------------------------------------------------------------------------------------
# Peak table.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
        ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None), ("Radeon 9000", None),
    ],
)  # fmt: skip
def test_peak_table(kind, expected):
    assert peak.peak_flops_per_device(kind) == expected


def test_peak_detects_this_host_as_unknown():
    assert jax.devices()[0].platform == "cpu"
    assert peak.peak_flops_per_device() is None
    assert "unknown" in peak.describe_peak()


# ----------------------------------------------------------------------------------------------------
# Ledger and budgets.
# ----------------------------------------------------------------------------------------------------


def test_ledger_json_round_trip():
    book = FlopLedger()
    book.start_stage("video_pretrain", 0)
    for _ in range(3):
        book.record("video_pretrain", 1.5e9, 8, 96, 0.25)
    book.end_stage("video_pretrain", 3)
    book.start_stage("action_tune", 3)
    book.record("action_tune", 2e9, 8, 160, 0.5)
    data = book.to_json()
    assert json.loads(json.dumps(data)) == data  # JSON-ready, as the checkpoint's JSON item needs
    for restored in (FlopLedger.from_json(data), FlopLedger.from_json(json.dumps(data))):
        assert restored == book
        assert restored.stage_flops("video_pretrain") == 4.5e9
        assert restored.stage_samples("action_tune") == 8 and restored.stage_tokens("video_pretrain") == 288
        assert restored.completed_stages == ["video_pretrain"]
        assert restored.stage_start_step == {"video_pretrain": 0, "action_tune": 3}
        assert restored.current_stage == "action_tune"
    assert book.total_flops() == 6.5e9
    with pytest.raises(KeyError, match="'flop'"):
        FlopLedger.from_json({"stages": {"video_pretrain": {"flop": 1.0}}})


def test_ledger_survives_resume_without_double_counting():
    """Checkpoint every 4 steps; the run dies at step 10 and resumes from step 8, redoing 9 and 10."""
    step_flops, batch, tokens = 3e9, 8, 100
    uninterrupted = FlopLedger()
    uninterrupted.start_stage("action_tune", 0)
    for _ in range(12):
        uninterrupted.record("action_tune", step_flops, batch, tokens, 1.0)

    live = FlopLedger()
    live.start_stage("action_tune", 0)
    saved = None
    for step in range(1, 11):
        live.record("action_tune", step_flops, batch, tokens, 1.0)
        if step % 4 == 0:
            saved = json.dumps(live.to_json())  # what the checkpoint stores
    resumed = FlopLedger.from_json(saved)
    assert resumed.stage_steps("action_tune") == 8
    for _ in range(9, 13):
        resumed.record("action_tune", step_flops, batch, tokens, 1.0)
    assert resumed == uninterrupted
    assert resumed.stage_flops("action_tune") == 12 * step_flops


def test_old_format_ledger_is_read_as_dense_and_converted_never_mixed():
    """A ledger a checkpoint stored before mask-aware counting: no units, no hardware FLOPs."""
    old = {"current_stage": "action_tune", "stages": {
        "video_pretrain": {"start_step": 0, "end_step": 10, "steps": 10, "samples": 80, "tokens": 960,
                           "flops": 10 * 4e9, "seconds": 5.0, "frozen_flops": 0.0},
        "action_tune": {"start_step": 10, "end_step": None, "steps": 4, "samples": 32, "tokens": 640,
                        "flops": 4 * 5e9, "seconds": 2.0, "frozen_flops": 1e8},
    }}  # fmt: skip
    book = FlopLedger.from_json(json.dumps(old))
    assert book.dense_stages() == ["video_pretrain", "action_tune"]
    assert book.stage_units("action_tune") == ledger.DENSE_UNITS and book.stage_flops("action_tune") == 20e9
    with pytest.raises(ValueError, match="'action_tune' holds dense FLOPs"):
        book.record("action_tune", 4e9, 8, 160, 0.5)
    with pytest.raises(ValueError, match="dense FLOP counts"):
        book.total_flops()
    # Resuming the stage converts it at its own per-step counts: 4 steps' worth of model and hardware FLOPs.
    factor = book.to_model_units("action_tune", model_per_step=4e9, dense_per_step=5e9, hardware_per_step=6e9)
    assert factor == pytest.approx(0.8)
    assert book.stage_flops("action_tune") == pytest.approx(16e9)
    assert book.stage_hardware_flops("action_tune") == pytest.approx(24e9)
    book.record("action_tune", 4e9, 8, 160, 0.5, hardware_flops=6e9)
    assert book.stage_flops("action_tune") == pytest.approx(20e9) and book.stage_steps("action_tune") == 5
    # The completed stage keeps its dense count, marked so through another save and restore.
    restored = FlopLedger.from_json(json.dumps(book.to_json()))
    assert restored == book and restored.dense_stages() == ["video_pretrain"]
    assert book.to_json()["units"] == ledger.MODEL_UNITS
    with pytest.raises(ValueError, match="units 'flops'"):
        FlopLedger.from_json({"stages": {"s": {"flops": 1.0, "units": "flops"}}})


def test_budget_math():
    assert steps_for_budget(9e21, 3e17) == 30_000  # an exact multiple keeps its last step
    assert steps_for_budget(1e10, 3e9) == 3
    assert steps_for_budget(0.0, 3e9) == 0
    with pytest.raises(ValueError, match="flops_per_step=0"):
        steps_for_budget(1e10, 0)
    book = FlopLedger()
    book.start_stage("s", 0)
    assert book.budget_fraction("s", 0.0) is None and book.eta_seconds("s", 0.0) is None
    assert book.eta_seconds("s", 1e10) is None  # no rate yet
    book.record("s", 2e9, 8, 10, 2.0)
    assert book.budget_fraction("s", 1e10) == pytest.approx(0.2)
    assert book.flops_per_second("s") == pytest.approx(1e9)
    assert book.eta_seconds("s", 1e10) == pytest.approx(8.0)
    assert book.eta_seconds("s", 1e10, flops_per_s=4e9) == pytest.approx(2.0)
    assert book.remaining_steps("s", 1e10, 2e9) == 4
    assert book.eta_seconds("s", 1e9) == 0.0


def test_budget_stop_spends_exactly_the_steps_a_budget_buys():
    step = stage.train_step_flops(stage_spec(_load_config("wam", "size=tiny,stage=action_tune"), "action_tune"))
    budget = 10.5 * step.train_per_step
    book = FlopLedger()
    book.start_stage("action_tune", 0)
    steps = stage_step_count(100, budget, step.train_per_step)
    for _ in range(steps):
        book.record("action_tune", step.train_per_step, step.batch_size, 20 * step.batch_size, 0.1)
    assert steps == steps_for_budget(budget, step.train_per_step) == 10
    assert stage_step_count(7, budget, step.train_per_step) == 7  # steps, when the budget buys more
    assert book.stage_flops("action_tune") <= budget
    assert 0.95 < book.budget_fraction("action_tune", budget) <= 1.0


def test_format_flops_units():
    assert format_flops(9.1e21) == "9.1 ZFLOPs"
    assert format_flops(6.6e22) == "66 ZFLOPs"
    assert format_flops(3.2e15) == "3.2 PFLOPs"
    assert format_flops(None) == "-"


# ----------------------------------------------------------------------------------------------------
# The estimate CLI and the field's configs.
# ----------------------------------------------------------------------------------------------------


def test_estimate_cli_json_keys_and_xla():
    result = _run_cli(
        "wamjax.flops.estimate", "--config=configs/wam.py:size=tiny,stage=action_tune",
        "--config.data.batch_size=4", "--steps=10", "--budget_flops=1e9", "--format=json", "--xla",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    est = json.loads(result.stdout)
    keys = ("video_tokens", "action_tokens", "text_tokens", "components", "forward_flops_per_sample",
            "train_flops_per_step", "xla_forward_flops_per_sample", "steps_for_budget", "total_train_flops")
    for key in keys:
        assert key in est, key
    assert (est["video_tokens"], est["action_tokens"], est["text_tokens"], est["batch_size"]) == (12, 8, 8, 4)
    assert est["train_flops_per_step"] == pytest.approx(3 * 4 * est["forward_flops_per_sample"])
    assert est["total_train_flops"] == pytest.approx(10 * est["train_flops_per_step"])
    assert est["steps_for_budget"] == int(1e9 // est["train_flops_per_step"])
    assert est["forward_flops_per_sample"] == pytest.approx(sum(est["components"].values()))
    assert est["xla_forward_flops_per_sample"] == pytest.approx(est["forward_flops_per_sample"], rel=0.03)


def test_estimate_cli_text_and_xla_refusal_for_big_sizes():
    result = _run_cli("wamjax.flops.estimate", "--config=configs/wam.py:size=wan14b,stage=video_pretrain",
                      "--samples=1000")
    assert result.returncode == 0, result.stderr
    assert "train per step" in result.stdout and "1000 samples" in result.stdout
    refused = _run_cli("wamjax.flops.estimate", "--config=configs/wam.py:size=wan14b,stage=action_tune",
                       "--xla")
    assert refused.returncode == 2 and "--xla refused" in refused.stderr


@pytest.mark.parametrize("name,stage,published", [
    ("dreamzero_action_tune", "action_tune", 1.5e22),  # the model FLOPs of its 100k steps; 6*N*D is 9e21
    ("wan14b_video_pretrain", "video_pretrain", 42e21),
])  # fmt: skip
def test_field_configs_state_their_budget_and_have_tiny_variants(name, stage, published):
    from wamjax.flops.estimate import estimate

    full = _load_config(name, "")
    assert full.size == "wan14b" and full.stage == stage
    assert full.stages[stage].budget_flops == published
    est = estimate(full, stage)
    ratio = est["total_train_flops"] / published
    # Stated assumptions, not fitted: the estimate must only be the same order of magnitude.
    assert 0.1 < ratio < 10, ratio
    if name == "dreamzero_action_tune":  # its budget buys every scheduled step
        assert est["total_train_flops"] <= full.stages[stage].budget_flops
    tiny = _load_config(name, "size=tiny")
    assert tiny.model.num_layers == SIZES["tiny"]["num_layers"]
    assert estimate(tiny, stage)["forward_flops_per_sample"] < 1e8


def test_dreamzero_config_six_nd_is_the_formula_of_its_own_values():
    c = _load_config("dreamzero_action_tune", "")
    assert (c.data.num_frames, c.data.frame_stride, c.data.action_horizon) == (33, 3, 24)
    assert (tuple(c.data.resolution), c.data.batch_size, c.train.steps) == ((352, 640), 128, 100_000)
    assert c.optim.learning_rate == 1e-5 and c.model.attention_layout == "chunk_causal"
    from wamjax.flops.estimate import estimate, format_text

    est = json.loads(json.dumps(estimate(c, "action_tune")))  # what --format=json prints
    latent_frames = 1 + (c.data.num_frames - 1) // 4
    per_frame = (c.data.resolution[0] // 16) * (c.data.resolution[1] // 16)
    assert per_frame == 880
    actions = (c.data.num_frames - 1) * c.data.frame_stride
    assert actions == 4 * c.data.action_horizon
    states = 1 + (c.data.num_frames - 1) // c.data.proprio_chunk_frames  # one proprio token per chunk
    assert states == 5
    tokens = latent_frames * per_frame + actions + states
    assert (est["video_tokens"], est["action_tokens"], est["six_nd_tokens_per_sample"]) == (7920, 96, tokens)
    # N: the Wan-14B backbone plus the action modules.
    assert 1.0 < est["six_nd_params"] / PUBLISHED_PARAM_COUNTS["wan14b"] < 1.03
    formula = 6 * est["six_nd_params"] * c.train.steps * c.data.batch_size * tokens
    assert est["six_nd_total_flops"] == pytest.approx(formula, rel=1e-12)
    assert est["six_nd_total_flops"] == pytest.approx(9.0e21, rel=0.03)  # the blog's 6 x 14B x 100k x 128 x 8,361
    assert "6*N*D" in est["six_nd_label"] and "model FLOPs" in est["total_train_flops_label"]
    assert est["total_train_flops"] > est["six_nd_total_flops"]  # attention scores and the rest come on top
    text = format_text(est)
    assert "6*N*D for 100000 steps: 8.95 ZFLOPs" in text and "[model FLOPs:" in text
    assert "hardware for 100000 steps" in text and "dense for 100000 steps" in text


def test_dreamzero_model_attention_is_the_visible_fraction_of_the_dense_count():
    """The teacher-forced layout shows 35.1% of its (query, key) pairs; the model count charges that share."""
    import numpy as np
    from mask_oracle import attention_mask

    from wamjax.flops.estimate import estimate
    from wamjax.models.token_layout import make_token_layout

    c = _load_config("dreamzero_action_tune", "")
    est = estimate(c, "action_tune")  # hardware on TPU: splash at model.attention_block_q x _kv
    cfg = stage_spec(c, "action_tune").model
    layout = make_token_layout(cfg, tuple(est["latent_shape"]), est["action_tokens"], est["proprio_tokens"],
                               teacher_forcing=True)
    reference = attention_mask(layout)  # the dense [S, S] oracle, 13,373^2 booleans
    assert layout.length == est["sequence_length"] == 13_373
    fraction = float(np.mean(reference))
    assert fraction == pytest.approx(0.351, abs=1e-3)
    att = est["attention"]
    assert att["visible_pairs"] == int(reference.sum()) and att["dense_pairs"] == layout.length**2
    dense = analytic.forward_flops(cfg, S(**_dreamzero_clip(c)), kernel="dot_product")
    model = est["components"]
    assert model["self_attention_scores"] / dense["self_attention_scores"] == pytest.approx(fraction, abs=1e-9)
    # What the ledger charged before: every pair; the difference is the masked scores, 3x in training.
    masked_scores = dense["self_attention_scores"] - model["self_attention_scores"]
    assert est["dense_flops_per_step"] - est["train_flops_per_step"] == pytest.approx(
        3 * masked_scores * c.data.batch_size, rel=1e-9)
    assert est["dense_flops_per_step"] == pytest.approx(1.83e17, rel=0.01)
    # Splash skips the empty 512 x 512 block pairs and computes the partial ones whole; full remat re-runs the
    # blocks' forward: hardware > dense > model.
    assert (att["kernel"], att["block_q"], att["block_kv"]) == ("splash", 512, 512)
    assert 0 < att["skipped_block_pairs"] < att["block_pairs"] == math.ceil(layout.length / 512) ** 2
    assert fraction < att["computed_fraction"] < 1
    assert est["total_hardware_flops"] > est["total_dense_flops"] > est["total_train_flops"]
    assert est["total_train_flops"] <= c.stages.action_tune.budget_flops


def _dreamzero_clip(c) -> dict:
    spec = stage_spec(c, "action_tune")
    return dict(mode="joint", num_frames=spec.clip.num_frames, resolution=spec.clip.resolution,
                text_length=spec.text_length, num_actions=spec.clip.actions, num_proprio=spec.clip.states or 1)


# ----------------------------------------------------------------------------------------------------
# The report CLI over metrics.jsonl.
# ----------------------------------------------------------------------------------------------------


def _row(step: int, stage: str, stage_steps: int, step_flops: float, budget: float, mfu: float | None,
         hardware_step_flops: float | None = None) -> dict:
    hardware = {} if hardware_step_flops is None else {
        "hardware_step_flops": hardware_step_flops, "stage_hardware_flops": stage_steps * hardware_step_flops,
        "hardware_utilization": None if mfu is None else mfu * hardware_step_flops / step_flops}
    return hardware | {
        "step": step, "stage": stage, "loss": 0.5, "step_flops": step_flops,
        "stage_flops": stage_steps * step_flops, "stage_steps": stage_steps, "stage_samples": 8 * stage_steps,
        "stage_tokens": 160 * stage_steps, "budget_flops": budget,
        "budget_fraction": stage_steps * step_flops / budget if budget else None,
        "flops_per_s": step_flops, "mfu": mfu, "wall_time_s": 1.0 * stage_steps, "eta_budget_s": None,
        "frozen_flops_per_step": 0.0,
    }  # fmt: skip


def _write_resumed_run(workdir: str) -> None:
    """video_pretrain logs every 2 steps to step 10, checkpoints at 6, is preempted mid-write after step 10,
    resumes at 6 and re-logs 8, 10 with new values, then action_tune runs steps 11..16 on a budget."""
    lines = [_row(s, "video_pretrain", s, 1e9, 0.0, None) for s in range(2, 11, 2)]
    lines[-1]["loss"] = "stale"
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 12, "stage": "video_'  # cut by preemption
    redo = [_row(s, "video_pretrain", s, 1e9, 0.0, None) for s in (8, 10)]
    text += "\n" + "".join(json.dumps(r) + "\n" for r in redo)
    stage_end = {"event": "stage_end", "stage": "video_pretrain", "step": 10, "reason": "steps"}
    text += json.dumps(stage_end) + "\n"
    tune = [_row(s, "action_tune", s - 10, 2e9, 12e9, 0.25, hardware_step_flops=3e9) for s in range(12, 17, 2)]
    text += "".join(json.dumps(r) + "\n" for r in tune)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, report.METRICS_FILE), "w") as f:
        f.write(text)


def test_report_counts_each_step_once_after_a_resume(tmp_path):
    workdir = str(tmp_path / "run")
    _write_resumed_run(workdir)
    warnings = []
    rows = report.read_metrics(os.path.join(workdir, report.METRICS_FILE), warnings.append)
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("video_pretrain", s) for s in (2, 4, 6, 8, 10)] + [("action_tune", s) for s in (12, 14, 16)]
    assert all(r["loss"] != "stale" for r in rows)  # the re-logged line wins
    assert len(warnings) == 1 and ":6:" in warnings[0]
    summaries, _ = report.summarize([workdir])
    pretrain, tune = summaries
    assert (pretrain["stage"], pretrain["steps"], pretrain["flops"], pretrain["samples"]) == (
        "video_pretrain", 10, 10e9, 80)
    assert pretrain["budget_fraction"] is None and pretrain["mean_mfu"] is None
    assert (tune["steps"], tune["flops"], tune["budget_flops"]) == (6, 12e9, 12e9)
    assert tune["budget_fraction"] == pytest.approx(1.0) and tune["mean_mfu"] == pytest.approx(0.25)
    # Model FLOPs are spent against the budget; hardware FLOPs and their utilization stand beside them.
    assert tune["hardware_flops"] == 18e9 and tune["mean_hardware_utilization"] == pytest.approx(0.375)
    assert pretrain["hardware_flops"] is None and pretrain["mean_hardware_utilization"] is None  # not logged


def test_report_completes_a_stage_that_ended_between_log_intervals(tmp_path):
    path = tmp_path / report.METRICS_FILE
    lines = [_row(s, "action_tune", s, 2e9, 9e9, None) for s in (2, 4)]
    end = {"event": "stage_end", "stage": "action_tune", "step": 5, "reason": "budget", "stage_flops": 10e9}
    lines.append(end)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    (summary,), _ = report.summarize([str(tmp_path)])
    assert (summary["steps"], summary["flops"], summary["samples"], summary["last_step"]) == (5, 10e9, 40, 5)
    assert summary["budget_fraction"] == pytest.approx(10 / 9)


def test_report_drops_lines_of_an_attempt_that_a_resume_redid(tmp_path):
    path = tmp_path / report.METRICS_FILE
    lines = [_row(s, "video_pretrain", s, 1e9, 0.0, None) for s in (5, 10, 15, 20)]
    # Resumed from step 10, preempted again after logging 15: the first attempt's 15 and 20 are void.
    lines += [_row(15, "video_pretrain", 15, 1e9, 0.0, None)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = report.read_metrics(str(path))
    assert [r["step"] for r in rows] == [5, 10, 15]


def test_report_cli_formats_and_plot(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    _write_resumed_run(first)
    _write_resumed_run(second)
    plot_path = str(tmp_path / "flops.png")
    table = _run_cli("wamjax.flops.report", f"--workdir={first}", f"--workdir={second}",
                     f"--plot={plot_path}")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("video_pretrain") == 2 and "100.0%" in table.stdout and "25.0%" in table.stdout
    assert "hardware FLOPs" in table.stdout and "18 GFLOPs" in table.stdout and "37.5%" in table.stdout
    with open(plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    as_json = json.loads(_run_cli("wamjax.flops.report", f"--workdir={first}", "--format=json").stdout)
    assert [(s["stage"], s["steps"]) for s in as_json["stages"]] == [("video_pretrain", 10), ("action_tune", 6)]
    assert as_json["runs"] == [{**as_json["runs"][0], "workdir": first, "processes": [], "goodput": None}]
    assert all(s["goodput"] is None and s["redone_steps"] is None for s in as_json["stages"])  # not recorded
    as_csv = _run_cli("wamjax.flops.report", f"--workdir={first}", "--format=csv").stdout.splitlines()
    assert as_csv[0].split(",") == list(report.COLUMNS) and len(as_csv) == 3
    missing = _run_cli("wamjax.flops.report", f"--workdir={tmp_path / 'nope'}")
    assert missing.returncode == 2 and "metrics.jsonl does not exist" in missing.stderr


def test_ledger_module_exports():
    assert ledger.FlopLedger is FlopLedger and callable(ledger.steps_for_budget)


def test_resume_from_a_dense_ledger_converts_it_and_says_so(tmp_path, caplog):
    """A checkpoint written before mask-aware counting (its ledger in dense units, no `units`) resumes with its
    stage FLOPs converted to model FLOPs, said in the log, and the run goes on in model FLOPs only."""
    import logging

    from train_utils import metrics_rows

    from wamjax.checkpoint import manager as ckpt
    from wamjax.train.loop import train

    config = _load_config("dreamzero_action_tune", "size=tiny")  # chunk-causal, teacher-forced: masked
    config.train.steps, config.train.log_every = 2, 1
    config.checkpoint.async_save, config.checkpoint.every_steps = False, 2
    workdir = str(tmp_path)
    train(config, workdir)
    step = stage.train_step_flops(stage_spec(config, "action_tune"))
    assert step.train_per_step < step.dense_per_step  # the mask hides pairs: the two units differ
    path = os.path.join(ckpt.step_dir(workdir, 2), "ledger", "metadata")
    with open(path) as f:
        saved = json.load(f)
    assert saved["units"] == ledger.MODEL_UNITS
    assert saved["stages"]["action_tune"]["flops"] == pytest.approx(2 * step.train_per_step)
    # Rewrite it as the old code wrote a periodic checkpoint of a 4-step stage: every pair counted, no units, no
    # hardware FLOPs, the stage still running.
    saved.pop("units")
    record = saved["stages"]["action_tune"]
    record.pop("units"), record.pop("hardware_flops")
    record["flops"], record["end_step"] = 2 * step.dense_per_step, None
    with open(path, "w") as f:
        json.dump(saved, f)

    config.train.steps = 4
    with caplog.at_level(logging.WARNING):
        train(config, workdir)
    assert any("dense counts" in r.getMessage() for r in caplog.records)
    assert any("converted to model FLOPs" in r.getMessage() for r in caplog.records)
    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["stage_flops"] == pytest.approx(4 * step.train_per_step, rel=1e-12)
    assert rows[-1]["stage_hardware_flops"] == pytest.approx(4 * step.hardware_per_step, rel=1e-12)
    final = FlopLedger.from_json(ckpt.read_json_item(ckpt.step_dir(workdir, 4), "ledger"))
    assert final.dense_stages() == [] and final.stage_steps("action_tune") == 4
