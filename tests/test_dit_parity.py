"""The JAX DiT against diffusers' WanTransformer3DModel, and Wan's published parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from wamjax.export.wan_import import WeightImportError, import_diffusers_wan
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
