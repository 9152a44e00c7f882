"""The frozen CLIP vision encoder of Wan2.1-I2V against transformers' CLIPVisionModel, its loader and FLOPs."""

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from wamjax.checkpoint import clip_import
from wamjax.checkpoint.wan_import import WeightImportError
from wamjax.models import clip

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=64, hidden_act="gelu", projection_dim=16)


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the 0/1 initializations, so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("clip") / "image_encoder"
    model.save_pretrained(folder)
    return model, str(folder)


def test_penultimate_hidden_states_match_transformers(saved_clip):
    model, folder = saved_clip
    cfg, params = clip_import.load(folder)
    assert cfg.num_tokens == 17 and cfg.hidden_act == "gelu"
    pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    ours = np.asarray(jax.jit(clip.penultimate_hidden_states, static_argnums=0)(cfg, params, pixels))
    assert ours.shape == (2, 17, 32)
    assert np.abs(ours - ref.hidden_states[-2].numpy()).max() < 1e-4
    assert np.abs(ours - ref.hidden_states[-1].numpy()).max() > 1e-3  # the last layer is skipped, as Wan does


def test_preprocess_matches_clip_image_processor():
    cfg = clip.CLIPVisionConfig(**{k: v for k, v in TINY.items() if k != "projection_dim"})
    frames = np.random.default_rng(1).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)  # wide: centre crop
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = processor(images=list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(clip.preprocess(cfg, frames)) - ref).max() < 1e-5


def test_strict_keys_name_the_key(saved_clip):
    model, _ = saved_clip
    cfg = clip.CLIPVisionConfig.from_transformers(model.config.to_dict())
    state = model.state_dict()
    key = "vision_model.encoder.layers.1.mlp.fc2.bias"
    with pytest.raises(WeightImportError, match=f"missing key '{key}'"):
        clip_import.state_dict_to_params({k: v for k, v in state.items() if k != key}, cfg)
    with pytest.raises(WeightImportError, match="unexpected key 'text_model.x'"):
        clip_import.state_dict_to_params(dict(state, **{"text_model.x": torch.zeros(1)}), cfg)
    with pytest.raises(WeightImportError, match="embeddings.class_embedding' has shape"):
        bad = dict(state, **{"vision_model.embeddings.class_embedding": torch.zeros(5)})
        clip_import.state_dict_to_params(bad, cfg)


def test_encode_flops_match_xla():
    # Wide enough that matmuls dominate, as in ViT-H/14; elementwise ops are left out of the count.
    cfg = clip.CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=512)
    params = clip.init_params(cfg, 0)
    pixels = jax.ShapeDtypeStruct((4, 32, 32, 3), np.float32)
    compiled = jax.jit(lambda p, x: clip.penultimate_hidden_states(cfg, p, x)).lower(params, pixels).compile()
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
    assert abs(clip.encode_flops(cfg, 4) - xla) / xla < 0.1
