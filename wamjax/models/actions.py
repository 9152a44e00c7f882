"""Action and proprio tokens: encoders, their own timestep embedding and modulation, and the action decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from wamjax.models.config import ModelConfig
from wamjax.models.dit import TimeEmbedding
from wamjax.models.layers import MLP2, Dense, constrain

# Token types added to action and proprio tokens (video tokens carry RoPE positions instead).
ACTION_TYPE, PROPRIO_TYPE = 0, 1


class ActionTokens(nn.Module):
    """Everything the WAM adds to the video backbone; all parameters live under one `actions` subtree."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.action_encoder = MLP2(cfg.dim, cfg.dim, "silu", ("action", "embed"), name="action_encoder")
        self.proprio_encoder = MLP2(cfg.dim, cfg.dim, "silu", ("action", "embed"), name="proprio_encoder")
        init = nn.initializers.normal(0.02)
        self.position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(init, (None, "embed")),
            (cfg.max_action_tokens, cfg.dim),
        )
        self.type_embedding = self.param(
            "type_embedding", nn.with_logical_partitioning(init, (None, "embed")), (2, cfg.dim)
        )
        self.time_embedder = TimeEmbedding(cfg, name="time_embedder")
        self.time_proj = Dense(6 * cfg.dim, (None, "embed"), name="time_proj")
        self.action_decoder = Dense(cfg.action_dim, ("embed", "action"), name="action_decoder")

    def encode_actions(self, actions: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
        """[B, T_a, action_dim] at action positions offset.. (a cached rollout's chunk) -> tokens [B, T_a, D]."""
        cfg = self.cfg
        num = actions.shape[1]
        if num > cfg.max_action_tokens:
            raise ValueError(f"{num} action tokens exceed model.max_action_tokens={cfg.max_action_tokens}")
        if actions.shape[-1] != cfg.action_dim:
            raise ValueError(f"actions have dim {actions.shape[-1]}, model.action_dim={cfg.action_dim}")
        tokens = self.action_encoder(actions.astype(jnp.float32))
        positions = jax.lax.dynamic_slice_in_dim(self.position_embedding, offset, num, axis=0)
        tokens = tokens + positions[None] + self.type_embedding[ACTION_TYPE]
        return constrain(tokens.astype(cfg.compute_dtype), ("batch", "length", "embed"))

    def encode_proprio(self, proprio: jax.Array) -> jax.Array:
        """[B, proprio_dim] -> one token [B, 1, D]; [B, C, proprio_dim] (one state per chunk) -> [B, C, D], one
        encoder shared by the chunks."""
        cfg = self.cfg
        if proprio.shape[-1] != cfg.proprio_dim:
            raise ValueError(f"proprio has dim {proprio.shape[-1]}, model.proprio_dim={cfg.proprio_dim}")
        token = self.proprio_encoder(proprio.astype(jnp.float32)) + self.type_embedding[PROPRIO_TYPE]
        return (token[:, None] if proprio.ndim == 2 else token).astype(cfg.compute_dtype)

    def time(self, timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Action-side timestep embedding and its 6-way modulation, independent of the video's."""
        temb = self.time_embedder(timesteps)
        mod = self.time_proj(jax.nn.silu(temb))
        return temb, mod.reshape(*mod.shape[:-1], 6, self.cfg.dim)

    def decode(self, hidden: jax.Array) -> jax.Array:
        """Final-normed action tokens [B, T_a, D] -> velocity [B, T_a, action_dim]."""
        return self.action_decoder(hidden.astype(jnp.float32))
