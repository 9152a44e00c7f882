"""World-action model semantics: joint tokens, independent noise levels, chunk-wise causal attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import attention_mask
from param_trees import backbone_params

from wamjax.models import wam
from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.token_layout import make_token_layout

CFG = ModelConfig.from_dict({**SIZES["tiny"], "in_channels": 4, "out_channels": 4})
LATENT = (3, 4, 4, 4)  # F, H, W, C: 1 context latent frame + 2 future ones
NUM_ACTIONS = 8  # 4 per future latent frame


def _inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return dict(
        latents=rng.standard_normal((batch, *LATENT)).astype(np.float32),
        t_video=np.full((batch,), 500.0, np.float32),
        text_embeddings=rng.standard_normal((batch, 5, CFG.text_dim)).astype(np.float32),
        actions=rng.standard_normal((batch, NUM_ACTIONS, CFG.action_dim)).astype(np.float32),
        t_action=np.full((batch,), 300.0, np.float32),
        proprio=rng.standard_normal((batch, CFG.proprio_dim)).astype(np.float32),
    )


def _params(cfg):
    return wam.init_params(cfg, jax.random.key(0), LATENT, 5, NUM_ACTIONS)


def test_joint_output_shapes_and_backbone_subtree():
    params = _params(CFG)
    out = wam.wam_forward(CFG, params, **_inputs())
    assert out.video.shape == (2, *LATENT)
    assert out.actions.shape == (2, NUM_ACTIONS, CFG.action_dim)
    video_only = wam.init_params(CFG, jax.random.key(0), LATENT, 5)
    assert set(params) - set(video_only) == {"actions"}
    # Video mode on the joint tree ignores the action modules entirely.
    x = _inputs()
    v1 = wam.dit_forward(CFG, params, x["latents"], x["t_video"], x["text_embeddings"])
    v2 = wam.dit_forward(CFG, backbone_params(params), x["latents"], x["t_video"], x["text_embeddings"])
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))


def test_action_noise_level_is_independent_of_video():
    params = _params(CFG)
    x = _inputs()
    base = wam.wam_forward(CFG, params, **x)
    changed = wam.wam_forward(CFG, params, **{**x, "t_action": np.full((2,), 900.0, np.float32)})
    # The action timestep changes the action prediction...
    assert np.abs(np.asarray(base.actions) - np.asarray(changed.actions)).max() > 1e-4
    # ...and per-frame video timesteps are honoured (frame 0 clean, others noisy).
    per_frame = np.tile(np.array([[0.0, 500.0, 500.0]], np.float32), (2, 1))
    out = wam.wam_forward(CFG, params, **{**x, "t_video": per_frame})
    assert np.abs(np.asarray(out.video) - np.asarray(base.video)).max() > 1e-4


def test_chunk_causal_mask_layout():
    cfg = dataclasses.replace(CFG, attention_layout="chunk_causal", chunk_latent_frames=1)
    layout = make_token_layout(cfg, LATENT[:3], NUM_ACTIONS, 1)
    mask = attention_mask(layout)
    nv = layout.num_video_tokens
    per_frame = nv // 3
    # video frame 0 (context) cannot see frame 1; frame 2 sees frames 0..2
    assert not mask[0, per_frame]
    assert mask[2 * per_frame, 0] and mask[2 * per_frame, per_frame]
    # the first 4 action tokens belong to latent frame 1, the next 4 to frame 2
    assert mask[nv, per_frame] and not mask[nv, 2 * per_frame]
    assert mask[nv + 4, 2 * per_frame]


def test_chunk_causal_future_does_not_change_past():
    cfg = dataclasses.replace(CFG, attention_layout="chunk_causal", chunk_latent_frames=1)
    params = _params(cfg)
    x = _inputs()
    out1 = wam.wam_forward(cfg, params, **x)
    latents2 = x["latents"].copy()
    latents2[:, 2] += 3.0  # perturb the last chunk
    actions2 = x["actions"].copy()
    actions2[:, 4:] -= 2.0  # and its actions
    out2 = wam.wam_forward(cfg, params, **{**x, "latents": latents2, "actions": actions2})
    v1, v2 = np.asarray(out1.video), np.asarray(out2.video)
    np.testing.assert_allclose(v1[:, :2], v2[:, :2], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out1.actions)[:, :4], np.asarray(out2.actions)[:, :4], atol=1e-5)
    assert np.abs(v1[:, 2] - v2[:, 2]).max() > 1e-3
    # the bidirectional layout lets the future leak back, as it should
    bidir = wam.wam_forward(CFG, params, **x).video
    bidir2 = wam.wam_forward(CFG, params, **{**x, "latents": latents2}).video
    assert np.abs(np.asarray(bidir)[:, 0] - np.asarray(bidir2)[:, 0]).max() > 1e-4


def test_padding_tokens_do_not_change_results():
    params = _params(CFG)
    x = _inputs()
    plain = wam.wam_forward(CFG, params, **x)
    padded = wam.wam_forward(CFG, params, **x, pad_to_multiple=16)
    np.testing.assert_allclose(np.asarray(plain.video), np.asarray(padded.video), atol=1e-5)
    np.testing.assert_allclose(np.asarray(plain.actions), np.asarray(padded.actions), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_and_bf16_run(policy):
    cfg = dataclasses.replace(CFG, remat_policy=policy, dtype="bfloat16")
    params = _params(cfg)
    loss = lambda p: jnp.mean(wam.wam_forward(cfg, p, **_inputs()).video ** 2)
    grads = jax.grad(loss)(params)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
    assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_i2v_joint_mode_reads_the_image_and_the_conditioning_channels():
    cfg = ModelConfig.from_dict({**SIZES["tiny-i2v"], "in_channels": 12, "out_channels": 4,
                                 "attention_layout": "chunk_causal"})
    rng = np.random.default_rng(1)
    x = _inputs()
    x["latents"] = np.asarray(wam.i2v_model_input(x["latents"], rng.standard_normal((2, *LATENT)).astype(np.float32)))
    x["image_embeddings"] = rng.standard_normal((2, 3, cfg.image_dim)).astype(np.float32)
    x["text_embeddings"] = rng.standard_normal((2, 5, cfg.text_dim)).astype(np.float32)
    params = jax.jit(lambda key: wam.init_params(cfg, key, (*LATENT[:3], 12), 5, NUM_ACTIONS))(jax.random.key(0))
    assert params["blocks"]["layers"]["block"]["attn2"]["add_k_proj"]["kernel"].shape == (2, cfg.dim, cfg.dim)
    forward = jax.jit(wam.wam_forward, static_argnums=0)
    out = forward(cfg, params, **x)
    assert out.video.shape == (2, *LATENT) and out.actions.shape == (2, NUM_ACTIONS, cfg.action_dim)
    other = forward(cfg, params, **{**x, "image_embeddings": rng.standard_normal((2, 3, cfg.image_dim))})
    assert np.abs(np.asarray(other.actions - out.actions)).max() > 1e-4
    # Action and proprio tokens sit on top exactly as on the T2V backbone: the same modules, the same tree.
    t2v = jax.eval_shape(lambda: wam.init_params(CFG, jax.random.key(0), LATENT, 5, NUM_ACTIONS))
    assert jax.tree.structure(params["actions"]) == jax.tree.structure(t2v["actions"])
    with pytest.raises(ValueError, match="image_embeddings were given but model.image_dim is None"):
        jax.eval_shape(lambda: wam.wam_forward(CFG, t2v, **{**_inputs(), "image_embeddings": x["image_embeddings"]}))


TF_LATENT = (4, 4, 4, 4)  # context frame + 3 one-frame chunks
TF_ACTIONS = 12


def test_teacher_forcing_mask_and_rope():
    cfg = dataclasses.replace(CFG, attention_layout="chunk_causal", chunk_latent_frames=1)
    layout = make_token_layout(cfg, TF_LATENT[:3], TF_ACTIONS, 1, pad_to_multiple=8, teacher_forcing=True)
    mask = attention_mask(layout)
    chunk, copy, valid = layout.token_chunk, layout.token_copy, layout.token_valid
    # Chunks 1 and 2 repeat clean (4 tokens per frame and 4 actions each); the last chunk has no clean copy.
    assert (layout.history_frames, layout.num_history_action_tokens) == (2, 8)
    assert layout.length % 8 == 0 and layout.num_padding_tokens > 0
    noisy, clean = valid & (copy == 1), valid & (copy == 0)
    assert noisy.sum() == 12 + TF_ACTIONS and clean.sum() == 4 + 1 + 8 + 8
    for q in np.flatnonzero(valid):
        seen = mask[q] & valid
        if copy[q] == 0:
            assert not (seen & noisy).any() and (chunk[seen] <= chunk[q]).all()
            assert seen[clean & (chunk <= chunk[q])].all()
        else:
            # Its own noisy chunk and the clean chunks before it, never its own clean copy or a later chunk.
            assert not (seen & clean & (chunk >= chunk[q])).any()
            assert not (seen & noisy & (chunk != chunk[q])).any()
            assert seen[(clean & (chunk < chunk[q])) | (noisy & (chunk == chunk[q]))].all()
    # A clean frame and its noisy copy share their rotary positions.
    per_frame, hist = 4, layout.history_offset
    for frame in (1, 2):
        np.testing.assert_array_equal(layout.rope_angles[hist + (frame - 1) * per_frame : hist + frame * per_frame],
                                      layout.rope_angles[frame * per_frame : (frame + 1) * per_frame])


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_one_proprio_token_per_chunk(teacher_forcing):
    cfg = dataclasses.replace(CFG, attention_layout="chunk_causal", chunk_latent_frames=1)
    layout = make_token_layout(cfg, TF_LATENT[:3], TF_ACTIONS, 4, pad_to_multiple=8, teacher_forcing=teacher_forcing)
    first = layout.num_video_tokens + TF_ACTIONS
    proprio = np.arange(first, first + 4)
    np.testing.assert_array_equal(layout.token_chunk[proprio], [0, 1, 2, 3])
    assert len(set(layout.token_group[proprio])) == 1 and layout.history_offset == first + 4
    mask = attention_mask(layout)
    chunk = layout.token_chunk
    video = np.arange(layout.num_video_tokens)
    for k in range(4):
        readers = np.flatnonzero(mask[:, proprio[k]] & layout.token_valid)
        own = readers[readers < layout.num_video_tokens + TF_ACTIONS]  # main-part video and actions
        # Chunk k's video and actions read state k; no earlier chunk reads it.
        assert set(video[chunk[video] == k]) <= set(own) and (chunk[own] >= k).all()
        if teacher_forcing and k:
            # Only its own noisy chunk: the clean history and later chunks read their own states instead.
            assert (chunk[readers] == k).all() and (layout.token_copy[readers] == 1).all()
    # A state token never reads a later chunk's state.
    assert not np.triu(mask[np.ix_(proprio, proprio)], 1).any()
    with pytest.raises(ValueError, match="3 proprio tokens"):
        make_token_layout(cfg, TF_LATENT[:3], TF_ACTIONS, 3)


def test_teacher_forced_forward_reads_only_the_clean_history_before_each_chunk():
    cfg = dataclasses.replace(CFG, attention_layout="chunk_causal", chunk_latent_frames=1)
    params = wam.init_params(cfg, jax.random.key(0), TF_LATENT, 5, TF_ACTIONS)
    rng = np.random.default_rng(1)
    x = {**_inputs(), "latents": rng.standard_normal((2, *TF_LATENT)).astype(np.float32),
         "actions": rng.standard_normal((2, TF_ACTIONS, cfg.action_dim)).astype(np.float32)}
    clean = {"history_latents": rng.standard_normal((2, *TF_LATENT)).astype(np.float32),
             "history_actions": rng.standard_normal((2, TF_ACTIONS, cfg.action_dim)).astype(np.float32)}
    forward = jax.jit(wam.wam_forward, static_argnums=0)
    base = forward(cfg, params, **x, **clean)
    assert base.video.shape == (2, *TF_LATENT) and base.actions.shape == (2, TF_ACTIONS, cfg.action_dim)
    # Changing the clean frame of chunk 2 (and its actions) moves chunk 3 only, not chunks 1 and 2.
    hist = clean["history_latents"].copy()
    hist[:, 2] += 3.0
    acts = clean["history_actions"].copy()
    acts[:, 4:8] -= 2.0
    moved = forward(cfg, params, **x, history_latents=hist, history_actions=acts)
    v0, v1 = np.asarray(base.video), np.asarray(moved.video)
    np.testing.assert_allclose(v1[:, 1:3], v0[:, 1:3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(moved.actions)[:, :8], np.asarray(base.actions)[:, :8], atol=1e-5)
    assert np.abs(v1[:, 3] - v0[:, 3]).max() > 1e-3
    # Noisy chunks do not see each other: changing noisy chunk 1 leaves chunks 2 and 3 as they were.
    lat = x["latents"].copy()
    lat[:, 1] += 3.0
    other = forward(cfg, params, **{**x, "latents": lat}, **clean)
    np.testing.assert_allclose(np.asarray(other.video)[:, 2:], v0[:, 2:], atol=1e-5)
    assert np.abs(np.asarray(other.video)[:, 1] - v0[:, 1]).max() > 1e-3
    # The clean copy of the last chunk is never read: the layout leaves it out.
    last = clean["history_latents"].copy()
    last[:, 3] += 5.0
    np.testing.assert_allclose(np.asarray(forward(cfg, params, **x, history_latents=last,
                                                  history_actions=clean["history_actions"]).video), v0, atol=1e-6)
    # Video mode (no action tokens) is teacher-forced the same way.
    video_only = {k: x[k] for k in ("latents", "t_video", "text_embeddings")}
    a = np.asarray(forward(cfg, params, **video_only, history_latents=clean["history_latents"]).video)
    b = np.asarray(forward(cfg, params, **video_only, history_latents=hist).video)
    np.testing.assert_allclose(b[:, 1:3], a[:, 1:3], atol=1e-5)
    assert np.abs(b[:, 3] - a[:, 3]).max() > 1e-3


def test_history_is_checked():
    with pytest.raises(ValueError, match="model.history='clean'"):
        dataclasses.replace(CFG, history="clean")
    x = _inputs()
    params = jax.eval_shape(lambda: _params(CFG))
    with pytest.raises(ValueError, match="model.history"):  # a bidirectional model has no teacher-forced layout
        jax.eval_shape(lambda: wam.wam_forward(CFG, params, **x, history_latents=x["latents"],
                                               history_actions=x["actions"]))
