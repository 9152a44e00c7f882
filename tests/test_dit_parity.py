"""The JAX DiT against diffusers' WanTransformer3DModel, and Wan's published parameter counts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from wamjax.checkpoint.wan_import import WeightImportError, import_diffusers_wan
from wamjax.models import wam
from wamjax.models.config import PUBLISHED_PARAM_COUNTS, SIZES, ModelConfig

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=8, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
)


def _random_diffusers_model(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the zero/one initializations so every weight matters
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_matches_diffusers_non_square(scan_layers):
    model = _random_diffusers_model()
    cfg = ModelConfig.from_dict({**TINY, "scan_layers": scan_layers})
    _, params = import_diffusers_wan(model.state_dict(), cfg)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 3, 4, 6, 4)).astype(np.float32)  # [B, F, H, W, C], H != W
    timestep = np.array([10.0, 870.0], np.float32)
    text = rng.standard_normal((2, 7, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(
            torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timestep), torch.from_numpy(text),
            return_dict=False,
        )[0].permute(0, 2, 3, 4, 1).numpy()
    out = np.asarray(wam.dit_forward(cfg, jax.tree.map(jnp.asarray, params), latents, timestep, text))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-4


def test_import_from_saved_folder_and_strict_keys(tmp_path):
    model = _random_diffusers_model(1)
    model.save_pretrained(tmp_path / "wan")
    cfg, params = import_diffusers_wan(str(tmp_path / "wan"))
    assert cfg.num_layers == 3 and cfg.attention_head_dim == 12
    assert params["blocks"]["layers"]["block"]["attn1"]["to_q"]["kernel"].shape == (3, 24, 24)

    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn2.to_v.bias"}
    with pytest.raises(WeightImportError, match="blocks.1.attn2.to_v.bias"):
        import_diffusers_wan(missing, cfg)
    extra = dict(state, **{"blocks.0.surprise.weight": torch.zeros(3)})
    with pytest.raises(WeightImportError, match="blocks.0.surprise.weight"):
        import_diffusers_wan(extra, cfg)
    bad_shape = dict(state, **{"proj_out.bias": torch.zeros(5)})
    with pytest.raises(WeightImportError, match="proj_out.bias"):
        import_diffusers_wan(bad_shape, cfg)


def test_fresh_init_has_the_imported_tree():
    cfg = ModelConfig.from_dict(TINY)
    _, imported = import_diffusers_wan(_random_diffusers_model().state_dict(), cfg)
    fresh = wam.init_params(cfg, jax.random.key(0), (3, 4, 6, 4), 7)
    assert jax.tree.structure(fresh) == jax.tree.structure(imported)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, fresh, imported)) == [True] * len(
        jax.tree.leaves(fresh)
    )


@pytest.mark.parametrize("size", ["wan1.3b", "wan14b"])
def test_published_parameter_counts(size):
    cfg = ModelConfig.from_dict(SIZES[size])
    shapes = jax.eval_shape(lambda: wam.init_params(cfg, jax.random.key(0), (21, 60, 104, 16), 512))
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        reference = WanTransformer3DModel(
            num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        )
    assert ours == sum(p.numel() for p in reference.parameters())
    assert abs(ours - PUBLISHED_PARAM_COUNTS[size]) / PUBLISHED_PARAM_COUNTS[size] < 0.02


# --- Image-to-video (Wan2.1-I2V): CLIP image tokens in every cross-attention, 2z + 4 input channels ----------

TINY_I2V = {**TINY, "in_channels": 12, "image_dim": 8, "added_kv_proj_dim": 24}
IMAGE_TOKENS = 5
# diffusers' attention processor splits image from text tokens assuming Wan's 512 text tokens.
DIFFUSERS_TEXT_LENGTH = 512


def _random_i2v_model(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_I2V, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("pos_embed_seq_len", [None, 2 * IMAGE_TOKENS])
def test_i2v_matches_diffusers_non_square(pos_embed_seq_len):
    model = _random_i2v_model(pos_embed_seq_len=pos_embed_seq_len)
    cfg = ModelConfig.from_dict({**TINY_I2V, "pos_embed_seq_len": pos_embed_seq_len})
    _, params = import_diffusers_wan(model.state_dict(), cfg)
    rng = np.random.default_rng(0)
    noisy = rng.standard_normal((2, 3, 4, 6, 4)).astype(np.float32)
    condition = rng.standard_normal((2, 3, 4, 6, 4)).astype(np.float32)
    latents = np.asarray(wam.i2v_model_input(noisy, condition))
    assert latents.shape == (2, 3, 4, 6, 12)
    timestep = np.array([10.0, 870.0], np.float32)
    text = rng.standard_normal((2, DIFFUSERS_TEXT_LENGTH, 16)).astype(np.float32)
    # FLF2V (pos_embed): diffusers takes the two frames' tokens as 2B rows, we take them concatenated per example.
    torch_image = rng.standard_normal((4 if pos_embed_seq_len else 2, IMAGE_TOKENS, 8)).astype(np.float32)
    image = torch_image.reshape(2, -1, 8)
    with torch.no_grad():
        ref = model(
            torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(timestep), torch.from_numpy(text),
            encoder_hidden_states_image=torch.from_numpy(torch_image), return_dict=False,
        )[0].permute(0, 2, 3, 4, 1).numpy()
    forward = jax.jit(wam.dit_forward, static_argnums=0)
    out = np.asarray(forward(cfg, jax.tree.map(jnp.asarray, params), latents, timestep, text, image_embeddings=image))
    assert out.shape == ref.shape == (2, 3, 4, 6, 4)
    assert np.abs(out - ref).max() < 1e-4
    # The image tokens matter: other images give another velocity.
    other_image = rng.standard_normal(image.shape).astype(np.float32)
    other = np.asarray(forward(cfg, jax.tree.map(jnp.asarray, params), latents, timestep, text,
                               image_embeddings=other_image))
    assert np.abs(other - out).max() > 1e-3


def test_i2v_import_from_saved_folder_and_strict_keys(tmp_path):
    model = _random_i2v_model(1)
    model.save_pretrained(tmp_path / "wan_i2v")
    cfg, params = import_diffusers_wan(str(tmp_path / "wan_i2v"))
    assert (cfg.image_dim, cfg.added_kv_proj_dim, cfg.in_channels) == (8, 24, 12)
    attn2 = params["blocks"]["layers"]["block"]["attn2"]
    assert attn2["add_k_proj"]["kernel"].shape == (3, 24, 24)
    np.testing.assert_array_equal(
        attn2["norm_added_k"]["scale"][2], model.blocks[2].attn2.norm_added_k.weight.detach().numpy()
    )
    embedder = params["condition_embedder"]["image_embedder"]
    np.testing.assert_array_equal(
        embedder["proj_out"]["kernel"], model.condition_embedder.image_embedder.ff.net[2].weight.detach().numpy().T
    )

    state = model.state_dict()
    for key in ("blocks.2.attn2.add_v_proj.bias", "condition_embedder.image_embedder.norm1.weight"):
        with pytest.raises(WeightImportError, match=f"missing key '{key}'"):
            import_diffusers_wan({k: v for k, v in state.items() if k != key}, cfg)
    with pytest.raises(WeightImportError, match="blocks.0.attn2.add_k_proj.weight' has shape"):
        import_diffusers_wan(dict(state, **{"blocks.0.attn2.add_k_proj.weight": torch.zeros(24, 7)}), cfg)
    with pytest.raises(WeightImportError, match="image_embedder.surprise"):
        import_diffusers_wan(dict(state, **{"condition_embedder.image_embedder.surprise": torch.zeros(3)}), cfg)
    t2v = ModelConfig.from_dict(TINY)  # the same weights read as text-to-video: the image keys are named
    with pytest.raises(WeightImportError, match="unexpected key 'blocks.0.attn2.add_k_proj.bias'.*I2V"):
        import_diffusers_wan(state, t2v)
    # diffusers itself drops an unused image-query norm that some converted checkpoints carry; so do we.
    _, same = import_diffusers_wan(dict(state, **{"blocks.1.attn2.norm_added_q.weight": torch.ones(24)}), cfg)
    assert jax.tree.structure(same) == jax.tree.structure(params)


def test_i2v_fresh_init_has_the_imported_tree_and_checks_inputs():
    cfg = ModelConfig.from_dict(TINY_I2V)
    _, imported = import_diffusers_wan(_random_i2v_model().state_dict(), cfg)
    fresh = jax.eval_shape(lambda: wam.init_params(cfg, jax.random.key(0), (3, 4, 6, 12), 7))
    assert jax.tree.structure(fresh) == jax.tree.structure(imported)
    assert [a.shape for a in jax.tree.leaves(fresh)] == [a.shape for a in jax.tree.leaves(imported)]
    latents, text = jnp.zeros((1, 3, 4, 6, 12)), jnp.zeros((1, 7, 16))
    with pytest.raises(ValueError, match="needs image_embeddings"):
        wam.dit_forward(cfg, imported, latents, jnp.zeros(1), text)
    with pytest.raises(ValueError, match="latents have 4 channels.*in_channels=12"):
        wam.dit_forward(cfg, imported, latents[..., :4], jnp.zeros(1), text, image_embeddings=jnp.zeros((1, 5, 8)))
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        ModelConfig.from_dict({**TINY, "image_dim": 8})


def test_i2v_conditioning_matches_the_diffusers_pipeline():
    """`first_frame_video` -> our VAE -> `i2v_condition` gives WanImageToVideoPipeline.prepare_latents' 20 channels."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    from wamjax.checkpoint.wan_vae_import import convert_diffusers_vae_state, infer_vae_config
    from wamjax.models import vae as vae_lib

    torch.manual_seed(0)
    z = 4
    vae = AutoencoderKLWan(base_dim=8, z_dim=z, num_res_blocks=1, latents_mean=[0.1] * z,
                           latents_std=[2.0] * z).eval()
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(), image_processor=None,
                                   image_encoder=None, transformer=None)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, 16, 24)).astype(np.float32)  # [B, 3, H, W] in [-1, 1], H != W
    with torch.no_grad():
        _, ref = pipe.prepare_latents(torch.from_numpy(image), 1, z, 16, 24, 9, torch.float32, torch.device("cpu"))
    ref = ref.permute(0, 2, 3, 4, 1).numpy()  # [B, F, H, W, 4 + z]

    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    vae_cfg = infer_vae_config(state)
    vae_cfg = dataclasses.replace(vae_cfg, latents_mean=(0.1,) * z, latents_std=(2.0,) * z)
    vae_params = convert_diffusers_vae_state(state, vae_cfg)
    video = np.repeat(image.transpose(0, 2, 3, 1)[:, None], 9, axis=1)  # every frame; only frame 0 may count
    cond = vae_lib.normalize_latents(vae_cfg, vae_lib.vae_encode(vae_cfg, vae_params, wam.first_frame_video(video)))
    ours = np.asarray(wam.i2v_condition(cond))
    assert ours.shape == ref.shape == (1, 3, 2, 3, 4 + z)
    np.testing.assert_array_equal(ours[..., :4], ref[..., :4])
    assert np.abs(ours - ref).max() < 1e-4


def test_i2v_parameter_count_equals_diffusers():
    cfg = ModelConfig.from_dict(SIZES["wan14b-i2v"])
    shapes = jax.eval_shape(lambda: wam.init_params(cfg, jax.random.key(0), (21, 60, 104, 36), 512))
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        reference = WanTransformer3DModel(**{k: v for k, v in cfg.diffusers_config().items() if k[0] != "_"})
    assert ours == sum(p.numel() for p in reference.parameters()) == PUBLISHED_PARAM_COUNTS["wan14b-i2v"]


# --- Wan2.2-TI2V-5B: the same transformer over 48 channels, the first latent frame clean (per-token timesteps) ---

TINY_TI2V = {**TINY, "in_channels": 48, "out_channels": 48}


def test_ti2v_with_a_clean_first_frame_matches_diffusers_per_token_timesteps(tmp_path):
    torch.manual_seed(3)
    model = WanTransformer3DModel(**TINY_TI2V).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = ModelConfig.from_dict(TINY_TI2V)
    _, params = import_diffusers_wan(model.state_dict(), cfg)
    rng = np.random.default_rng(0)
    b, f, h, w = 2, 3, 4, 6
    latents = rng.standard_normal((b, f, h, w, 48)).astype(np.float32)
    text = rng.standard_normal((b, 7, 16)).astype(np.float32)
    # Wan 2.2's text-image-to-video: the first latent frame is the clean image (t = 0), the rest share t.
    t_frames = np.array([[0.0, 640.0, 640.0], [0.0, 35.0, 35.0]], np.float32)
    tokens_per_frame = (h // 2) * (w // 2)
    t_tokens = np.repeat(t_frames, tokens_per_frame, axis=1)  # diffusers' [B, seq_len] timesteps
    with torch.no_grad():
        ref = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(t_tokens),
                    torch.from_numpy(text), return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    out = np.asarray(wam.wam_forward(cfg, jax.tree.map(jnp.asarray, params), latents, t_frames, text).video)
    assert out.shape == ref.shape == (b, f, h, w, 48)
    assert np.abs(out - ref).max() < 1e-4
    # Exported back, diffusers loads the same model.
    from wamjax.export.to_torch import write_diffusers_transformer

    write_diffusers_transformer(tmp_path / "ti2v", cfg, params)
    back = WanTransformer3DModel.from_pretrained(tmp_path / "ti2v").eval()
    assert back.config.in_channels == 48
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # Per frame is what it reads: one timestep for the whole clip gives another output.
    with torch.no_grad():
        whole = model(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(t_frames[:, 1]),
                      torch.from_numpy(text), return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(whole - ref).max() > 1e-3


def test_ti2v_5b_parameter_count_equals_diffusers():
    cfg = ModelConfig.from_dict(SIZES["wan2.2-ti2v-5b"])
    assert (cfg.dim, cfg.num_layers, cfg.in_channels, cfg.ffn_dim) == (3072, 30, 48, 14336)
    shapes = jax.eval_shape(lambda: wam.init_params(cfg, jax.random.key(0), (21, 44, 80, 48), 512))
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        reference = WanTransformer3DModel(**{k: v for k, v in cfg.diffusers_config().items() if k[0] != "_"})
    assert ours == sum(p.numel() for p in reference.parameters()) == PUBLISHED_PARAM_COUNTS["wan2.2-ti2v-5b"]
