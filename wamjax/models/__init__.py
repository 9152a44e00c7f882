"""Pure Flax modules and their functional forwards: the Wan DiT with action tokens, the Wan VAE, text lookups."""

from wamjax.models.config import SIZES, ModelConfig
from wamjax.models.text import TextEmbeddingCache
from wamjax.models.vae import (
    VAEConfig,
    denormalize_latents,
    init_vae_params,
    normalize_latents,
    vae_config_for,
    vae_decode,
    vae_encode,
    vae_param_count,
)
from wamjax.models.wam import WamOutput, WorldActionModel, dit_forward, init_params, wam_forward

__all__ = [
    "SIZES", "ModelConfig", "TextEmbeddingCache", "VAEConfig", "WamOutput", "WorldActionModel", "denormalize_latents",
    "dit_forward", "init_params", "init_vae_params", "normalize_latents", "vae_config_for", "vae_decode",
    "vae_encode", "vae_param_count", "wam_forward",
]
