"""A plain-PyTorch reference of the wamjax world-action model (video + action denoiser), torch only.

This file depends on torch and safetensors alone (no JAX, no diffusers) and can be copied next to a script.
It loads the folder written by `python -m wamjax.export.to_torch` and reproduces the JAX forward:

    model = WorldActionModel.from_pretrained("OUT")          # OUT/wam.safetensors + OUT/wam_config.json
    video_velocity, action_velocity = model(latents, timestep, text, actions, t_action, proprio)
    latents, actions = sample(model, context, text, proprio, video_noise, action_noise, mode="imagine_then_act")

`sample` runs the three ways to act (joint, imagine_then_act, world_model) with Euler steps, as the JAX
sampler does.

Conventions (those of wamjax.models.wam): latents are [B, C, F, H, W] like diffusers' WanTransformer3DModel;
timesteps are on Wan's 0..1000 scale, `timestep` [B] or per latent frame [B, F], `t_action` [B] or per action
token [B, T_a]; the outputs are flow-matching velocities (noise - x0). Without `actions` the model is the
Wan video backbone alone; the proprio token joins only together with actions and always reads timestep 0.
The state dict's backbone keys are diffusers' names, the action modules live under `actions.`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WAM_WEIGHTS_NAME = "wam.safetensors"
WAM_CONFIG_NAME = "wam_config.json"
NORM_STATS_NAME = "norm_stats.json"
ACTION_TYPE, PROPRIO_TYPE = 0, 1


@dataclasses.dataclass(frozen=True)
class WamConfig:
    """The architecture fields of wamjax's ModelConfig that the forward needs (execution fields ignored)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    pos_embed_seq_len: int | None = None
    action_dim: int = 7
    proprio_dim: int = 8
    max_action_tokens: int = 256
    action_frames_per_latent: int = 4
    attention_layout: str = "bidirectional"
    chunk_latent_frames: int = 1

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WamConfig:
        """Keeps the fields above from a wamjax model config dict (execution settings such as `scan_layers`
        or `remat_policy` do not change the math and are dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(int(p) for p in kwargs["patch_size"])
        if kwargs.get("attention_layout", "bidirectional") not in ("bidirectional", "chunk_causal"):
            raise ValueError(f"attention_layout={kwargs['attention_layout']!r}; "
                             "expected 'bidirectional' or 'chunk_causal'")
        return cls(**kwargs)


# --- Building blocks ---------------------------------------------------------------------------------------

def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[...] -> [..., dim] features ordered (cos, sin), as diffusers' Timesteps(flip_sin_to_cos=True)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[..., None] * torch.exp(exponent)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class MLP2(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' embedding MLP names)."""

    def __init__(self, fan_in: int, hidden: int, out: int, activation: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(fan_in, hidden)
        self.linear_2 = nn.Linear(hidden, out)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.activation == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


class RMSNorm(nn.Module):
    """RMS norm over the last axis (all heads together, as Wan), in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """Layer norm in float32, affine when `norm` is given."""
    xf = x.float()
    if norm is None:
        return F.layer_norm(xf, xf.shape[-1:], eps=eps)
    return F.layer_norm(xf, xf.shape[-1:], norm.weight.float(), norm.bias.float(), eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs of x [B, S, H, D] by angles with cos/sin [S, D // 2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Wan self- or cross-attention: q/k RMS-normed across heads; `to_out.0` as in diffusers. With `image`
    (Wan2.1-I2V cross-attention) the queries also attend to the image tokens through `add_k_proj`/`add_v_proj`
    and the two attention outputs are summed."""

    def __init__(self, cfg: WamConfig, image: bool = False):
        super().__init__()
        d = cfg.dim
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Identity()])
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)
        if image:
            self.add_k_proj = nn.Linear(cfg.added_kv_proj_dim, d)
            self.add_v_proj = nn.Linear(cfg.added_kv_proj_dim, d)
            self.norm_added_k = RMSNorm(d, cfg.eps)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv_in = x if context is None else context
        split = lambda t: t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, self.head_dim))
        k = self.norm_k(self.to_k(kv_in)).unflatten(-1, (self.heads, self.head_dim))
        v = self.to_v(kv_in).unflatten(-1, (self.heads, self.head_dim))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = q.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        if image is not None:
            k_img = split(self.norm_added_k(self.add_k_proj(image)))
            out = out + F.scaled_dot_product_attention(q, k_img, split(self.add_v_proj(image)))
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GeluProj(nn.Module):
    """diffusers' GELU(approximate='tanh') module: `proj` then the activation."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`net.0.proj` -> GELU(tanh) -> `net.2`, diffusers' names."""

    def __init__(self, cfg: WamConfig):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(cfg.dim, cfg.ffn_dim), nn.Identity(), nn.Linear(cfg.ffn_dim, cfg.dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Block(nn.Module):
    """One Wan block with modulation per token (each token reads its group's timestep)."""

    def __init__(self, cfg: WamConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn1, self.attn2 = Attention(cfg), Attention(cfg, image=cfg.image_dim is not None)
        self.norm2 = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(cfg)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, context, token_modulation, rope, mask, image=None):
        # token_modulation [B, S, 6, D] in float32.
        mod = self.scale_shift_table.float()[None] + token_modulation
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod.unbind(2)
        dtype = x.dtype
        h = layer_norm(x, self.eps) * (1 + scale_msa) + shift_msa
        h = self.attn1(h.to(dtype), rope=rope, mask=mask)
        x = (x.float() + h.float() * gate_msa).to(dtype)
        h = layer_norm(x, self.eps, self.norm2) if self.norm2 is not None else x
        x = x + self.attn2(h.to(dtype), context=context, image=image)
        h = layer_norm(x, self.eps) * (1 + c_scale) + c_shift
        h = self.ffn(h.to(dtype))
        return (x.float() + h.float() * c_gate).to(dtype)


class ImageEmbedder(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, linear, GELU, linear, LayerNorm (diffusers' WanImageEmbedding);
    with `pos_embed_seq_len` a learned position embedding is added first (tokens [B, pos_embed_seq_len, D])."""

    def __init__(self, cfg: WamConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.image_dim)  # torch's default eps, as diffusers
        self.ff = nn.Module()  # diffusers' FeedForward names: ff.net.0.proj, ff.net.2
        self.ff.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(cfg.image_dim, cfg.dim)])
        self.ff.net[0].proj = nn.Linear(cfg.image_dim, cfg.image_dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.pos_embed = None
        if cfg.pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_seq_len, cfg.image_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            if image.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"image has {image.shape[1]} tokens; pos_embed_seq_len={self.pos_embed.shape[1]}")
            image = image + self.pos_embed
        h = layer_norm(image, self.norm1.eps, self.norm1).to(image.dtype)
        h = self.ff.net[2](F.gelu(self.ff.net[0].proj(h)))
        return layer_norm(h, self.norm2.eps, self.norm2).to(image.dtype)


class ConditionEmbedder(nn.Module):
    """diffusers' WanTimeTextImageEmbedding (the image branch only for image-conditioned exports)."""

    def __init__(self, cfg: WamConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP2(cfg.freq_dim, cfg.dim, cfg.dim, "silu")
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = MLP2(cfg.text_dim, cfg.dim, cfg.dim, "gelu_tanh")
        if cfg.image_dim is not None:
            self.image_embedder = ImageEmbedder(cfg)


class ActionModules(nn.Module):
    """Action and proprio token encoders, their own timestep embedding, and the action decoder."""

    def __init__(self, cfg: WamConfig):
        super().__init__()
        d = cfg.dim
        self.action_encoder = MLP2(cfg.action_dim, d, d, "silu")
        self.proprio_encoder = MLP2(cfg.proprio_dim, d, d, "silu")
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_action_tokens, d))
        self.type_embedding = nn.Parameter(torch.zeros(2, d))
        self.time_embedder = MLP2(cfg.freq_dim, d, d, "silu")
        self.time_proj = nn.Linear(d, 6 * d)
        self.action_decoder = nn.Linear(d, cfg.action_dim)


def _time(embedder: MLP2, proj: nn.Linear, freq_dim: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [B, G] -> (temb [B, G, D], modulation [B, G, 6, D]), in float32."""
    temb = _mlp_f32(embedder, sinusoidal_embedding(t, freq_dim))
    mod = F.linear(F.silu(temb), proj.weight.float(), proj.bias.float())
    return temb, mod.unflatten(-1, (6, -1))


def _mlp_f32(mlp: MLP2, x: torch.Tensor) -> torch.Tensor:
    """A SiLU MLP2 evaluated in float32 whatever the weights' dtype (JAX keeps these embeddings in float32)."""
    h = F.linear(x.float(), mlp.linear_1.weight.float(), mlp.linear_1.bias.float())
    return F.linear(F.silu(h), mlp.linear_2.weight.float(), mlp.linear_2.bias.float())


def _per_group(t: torch.Tensor | float, batch: int, count: int, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim == 1:
        if t.shape[0] != batch:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({batch},) or ({batch}, {count})")
        return t[:, None].expand(batch, count)
    if tuple(t.shape) != (batch, count):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({batch},) or ({batch}, {count})")
    return t


# --- Token layout --------------------------------------------------------------------------------------------

def token_layout(
    cfg: WamConfig, grid: tuple[int, int, int], num_actions: int, num_proprio: int, views: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(group id per token [S], chunk id per token [S]) for [video | actions | proprio] tokens.

    Groups: one per latent frame, one per action token, one for proprio. Chunks: frame 0 is chunk 0, later
    frames come in chunks of `chunk_latent_frames`; an action token shares the chunk of the future frame it
    leads to; proprio token k is chunk k (one token: chunk 0; one per chunk: each its chunk's state). With a
    bidirectional layout every chunk id is 0. The `views` of a latent frame
    (tokens view layout) are adjacent and share its group and chunk.
    """
    gf, gh, gw = grid
    frame_idx = torch.arange(gf).repeat_interleave(views * gh * gw)
    f = torch.arange(gf)
    if cfg.attention_layout == "chunk_causal":
        per_chunk = max(cfg.chunk_latent_frames, 1)
        frame_chunk = torch.where(f == 0, 0, 1 + torch.div(f - 1, per_chunk, rounding_mode="floor"))
    else:
        frame_chunk = torch.zeros(gf, dtype=torch.long)
    action_frame = torch.clamp(1 + torch.arange(num_actions) // cfg.action_frames_per_latent, max=gf - 1)
    groups = torch.cat([frame_idx, gf + torch.arange(num_actions), torch.full((num_proprio,), gf + num_actions)])
    chunks = torch.cat([frame_chunk[frame_idx], frame_chunk[action_frame], torch.arange(num_proprio)])
    return groups, chunks


def rope_angles(cfg: WamConfig, grid: tuple[int, int, int], num_other: int, views: int = 1) -> torch.Tensor:
    """Rotary angles [S, head_dim // 2] in float64: Wan's (t, h, w) split for video tokens, 0 for the rest; every
    view of a frame at one view's positions."""
    head_dim = cfg.attention_head_dim
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    if max(grid) > cfg.rope_max_seq_len:
        raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len}")

    def axis(dim: int, positions: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
        return positions.double()[:, None] * inv[None, :]

    ff, _, hh, ww = torch.meshgrid(torch.arange(grid[0]), torch.arange(views), torch.arange(grid[1]),
                                   torch.arange(grid[2]), indexing="ij")
    video = torch.cat([axis(t_dim, ff.reshape(-1)), axis(h_dim, hh.reshape(-1)), axis(w_dim, ww.reshape(-1))], -1)
    return torch.cat([video, torch.zeros(num_other, head_dim // 2, dtype=torch.float64)])


# --- The model -------------------------------------------------------------------------------------------------

class WorldActionModel(nn.Module):
    """Joint video + action denoiser on a Wan-2.1 transformer; `forward` returns (video, action) velocities."""

    def __init__(self, cfg: WamConfig, with_actions: bool = True, views: int | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        pt, ph, pw = cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        self.proj_out = nn.Linear(d, cfg.out_channels * pt * ph * pw)
        self.actions = ActionModules(cfg) if with_actions else None
        # Tokens view layout: one learned row per camera, added to that view's tokens.
        self.view_embedding = nn.Parameter(torch.zeros(views, d)) if views else None

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> WorldActionModel:
        """Loads `path/wam_config.json` + `path/wam.safetensors`, strictly (a missing or unexpected key raises
        naming it). `dtype` defaults to the exported one; the export's config dict is kept as `.export_config`."""
        from safetensors.torch import load_file

        config_path = os.path.join(path, WAM_CONFIG_NAME)
        weights_path = os.path.join(path, WAM_WEIGHTS_NAME)
        for p in (config_path, weights_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p} not found: is {path} a wamjax export (python -m wamjax.export.to_torch)?")
        with open(config_path) as f:
            export_config = json.load(f)
        if "model" not in export_config:
            raise KeyError(f"{config_path} has no 'model' entry; expected the wamjax model config there")
        cfg = WamConfig.from_dict(export_config["model"])
        state = load_file(weights_path, device=str(device))
        views = state["view_embedding"].shape[0] if "view_embedding" in state else None
        model = cls(cfg, with_actions=any(k.startswith("actions.") for k in state), views=views)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"{weights_path}: missing keys {missing[:5]} ({len(missing)} in all), "
                           f"unexpected keys {unexpected[:5]} ({len(unexpected)} in all)")
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"{weights_path}: key {key!r} has shape {tuple(value.shape)}; "
                                 f"expected {tuple(expected[key].shape)} for the config in {config_path}")
        model.load_state_dict(state, strict=True)
        model.export_config = export_config
        target = dtype or next(iter(state.values())).dtype
        return model.to(device=device, dtype=target).eval()

    def embed_context(self, text: torch.Tensor, image: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(projected text [B, L, D], embedded image tokens [B, N, D] or None), as the JAX model's
        `embed_context`."""
        dtype = self.proj_out.weight.dtype
        embedder = self.condition_embedder
        image_context = None if image is None else embedder.image_embedder(image.to(dtype))
        return embedder.text_embedder(text.to(dtype)), image_context

    def embed_tokens(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        actions: torch.Tensor | None = None,
        t_action: torch.Tensor | float | None = None,
        proprio: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [B, S, D] of [video | actions | proprio], per-group timestep embedding [B, G, D], per-group
        modulation [B, G, 6, D]), as the JAX model's `embed_tokens`: one group per latent frame, one per action
        token, one for the proprio tokens (embedded whenever given)."""
        cfg = self.cfg
        views = None if self.view_embedding is None else self.view_embedding.shape[0]
        b, c, frames = latents.shape[:3]
        height, width = latents.shape[-2:]
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)
        dtype, device = self.proj_out.weight.dtype, latents.device
        if views is None:
            video_tokens = self.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2)
        else:  # each view patchified alone, its embedding row added, tokens ordered (frame, view, h, w)
            per_view = latents.permute(0, 3, 1, 2, 4, 5).reshape(b * views, c, frames, height, width)
            v_tokens = self.patch_embedding(per_view.to(dtype)).flatten(2).transpose(1, 2)
            v_tokens = v_tokens.reshape(b, views, grid[0], -1, v_tokens.shape[-1])
            v_tokens = v_tokens + self.view_embedding.to(dtype)[None, :, None, None]
            video_tokens = v_tokens.transpose(1, 2).reshape(b, -1, v_tokens.shape[-1])
        t_frames = _per_group(timestep, b, frames, "timestep", device)[:, ::pt][:, : grid[0]]
        embedder = self.condition_embedder
        temb, modulation = _time(embedder.time_embedder, embedder.time_proj, cfg.freq_dim, t_frames)
        tokens, tembs, modulations = [video_tokens], [temb], [modulation]
        am = self.actions
        if actions is not None:
            if t_action is None:
                raise ValueError("actions were given without t_action")
            num_actions = actions.shape[1]
            if num_actions > cfg.max_action_tokens or actions.shape[-1] != cfg.action_dim:
                raise ValueError(f"actions have shape {tuple(actions.shape)}; expected [B, <= "
                                 f"{cfg.max_action_tokens}, {cfg.action_dim}]")
            a = _mlp_f32(am.action_encoder, actions) + am.position_embedding.float()[None, :num_actions]
            a = a + am.type_embedding.float()[ACTION_TYPE]
            tokens.append(a.to(dtype))
            a_temb, a_mod = _time(am.time_embedder, am.time_proj, cfg.freq_dim,
                                  _per_group(t_action, b, num_actions, "t_action", device))
            tembs.append(a_temb)
            modulations.append(a_mod)
        if proprio is not None:
            num_proprio = 1 if proprio.ndim == 2 else proprio.shape[1]
            if proprio.shape not in ((b, cfg.proprio_dim), (b, num_proprio, cfg.proprio_dim)):
                raise ValueError(f"proprio has shape {tuple(proprio.shape)}; expected ({b}, {cfg.proprio_dim}) "
                                 f"or ({b}, chunks, {cfg.proprio_dim})")
            p = _mlp_f32(am.proprio_encoder, proprio.reshape(b, num_proprio, cfg.proprio_dim))
            tokens.append((p + am.type_embedding.float()[PROPRIO_TYPE]).to(dtype))
            # Proprio is an observation, never noised: it reads the clean-timestep modulation.
            p_temb, p_mod = _time(am.time_embedder, am.time_proj, cfg.freq_dim, torch.zeros(b, 1, device=device))
            tembs.append(p_temb)
            modulations.append(p_mod)
        return torch.cat(tokens, dim=1), torch.cat(tembs, dim=1), torch.cat(modulations, dim=1)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        text: torch.Tensor,
        actions: torch.Tensor | None = None,
        t_action: torch.Tensor | float | None = None,
        proprio: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latents [B, C, F, H, W] (several views, tokens view layout: [B, C, F, V, H, W]), timestep [B] or [B, F],
        text [B, L, text_dim], actions [B, T_a, action_dim], t_action [B] or [B, T_a], proprio [B, proprio_dim]
        (or one state per chunk [B, chunks, proprio_dim]), image [B, N, image_dim] (CLIP tokens, image-conditioned
        exports only) -> (video velocity [B, out_channels, F, H, W], action velocity [B, T_a, action_dim] or None).
        For I2V, latents carry all in_channels: noisy latents, 4 mask channels, conditioning-frame latents."""
        cfg = self.cfg
        views = None if self.view_embedding is None else self.view_embedding.shape[0]
        if latents.ndim != (5 if views is None else 6) or (views is not None and latents.shape[3] != views):
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this export expects "
                             f"{'[B, C, F, H, W]' if views is None else f'[B, C, F, {views}, H, W] ({views} views)'}")
        b, c, frames = latents.shape[:3]
        height, width = latents.shape[-2:]
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_channels or frames % pt or height % ph or width % pw:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected [B, {cfg.in_channels}, F, H, W] "
                             f"with (F, H, W) divisible by patch_size {cfg.patch_size}")
        if (image is None) != (cfg.image_dim is None):
            raise ValueError(f"image_dim={cfg.image_dim}: image tokens [B, N, image_dim] are required exactly when "
                             f"the export is image-conditioned (got image={'None' if image is None else 'a tensor'})")
        if actions is not None and self.actions is None:
            raise ValueError("actions were given but this export holds the video backbone only")
        grid = (frames // pt, height // ph, width // pw)
        dtype, device = self.proj_out.weight.dtype, latents.device
        num_actions = 0 if actions is None else actions.shape[1]
        num_proprio = 0 if (actions is None or proprio is None) else (1 if proprio.ndim == 2 else proprio.shape[1])

        x, group_temb, group_modulation = self.embed_tokens(latents, timestep, actions, t_action,
                                                            proprio if num_proprio else None)
        context, image_context = self.embed_context(text, image)
        groups, chunks = token_layout(cfg, grid, num_actions, num_proprio, views or 1)
        groups, chunks = groups.to(device), chunks.to(device)
        token_modulation = group_modulation[:, groups]  # [B, S, 6, D]
        token_temb = group_temb[:, groups]  # [B, S, D]
        angles = rope_angles(cfg, grid, num_actions + num_proprio, views or 1).to(device)
        rope = (torch.cos(angles).float(), torch.sin(angles).float())
        mask = None
        if cfg.attention_layout == "chunk_causal":
            mask = chunks[None, :] <= chunks[:, None]  # (query, key): a token sees chunks up to its own

        for block in self.blocks:
            x = block(x, context, token_modulation, rope, mask, image_context)

        out_mod = self.scale_shift_table.float()[None] + token_temb[:, :, None]
        shift, scale = out_mod[:, :, 0], out_mod[:, :, 1]
        h = layer_norm(x, cfg.eps) * (1 + scale) + shift
        nv = grid[0] * (views or 1) * grid[1] * grid[2]
        video = self.proj_out(h[:, :nv].to(dtype)).float()
        if views is None:
            video = video.reshape(b, *grid, pt, ph, pw, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
            video = video.reshape(b, cfg.out_channels, frames, height, width)
        else:
            gf, gh, gw = grid
            video = video.reshape(b, gf, views, gh, gw, pt, ph, pw, cfg.out_channels)
            video = video.permute(0, 8, 1, 5, 2, 3, 6, 4, 7).reshape(b, cfg.out_channels, frames, views, height, width)
        action_velocity = None
        if actions is not None:
            dec = self.actions.action_decoder
            action_velocity = F.linear(h[:, nv: nv + num_actions], dec.weight.float(), dec.bias.float())
        return video, action_velocity


def load_norm_stats(path: str) -> dict[str, Any]:
    """The normalization statistics exported next to the weights (`path/norm_stats.json`); {} for synthetic data.

    Layout: {"datasets": {name: {"action": {mean, std, q01, q99, mask, ...}, "proprio": {...}}}}; the method
    is the run's `data.action_normalization`, kept in wam_config.json under run_config.
    """
    with open(os.path.join(path, NORM_STATS_NAME)) as f:
        return json.load(f)


def unnormalize(values: torch.Tensor, group_stats: dict[str, Any], method: str) -> torch.Tensor:
    """Maps normalized values [..., D] back to dataset units on the masked dimensions (the inverse of
    data_pipelines.standardize.stats.normalize: "bounds" maps [-1, 1] to [q01, q99], "normal" scales by std and
    adds mean). A model padded to a wider `action_dim` than the dataset's embodiment: slice its actions to the
    stats' width first."""
    dim = values.shape[-1]
    for key in ("mask", "q01", "q99", "mean", "std"):
        if key in group_stats and len(group_stats[key]) != dim:
            raise ValueError(f"stats {key!r} have {len(group_stats[key])} values; the input has {dim} dimensions")
    as_tensor = lambda key: torch.as_tensor(group_stats[key], dtype=torch.float32, device=values.device)
    mask = torch.as_tensor(group_stats["mask"], dtype=torch.bool, device=values.device)
    x = values.float()
    if method in ("bounds", "quantile"):
        low, high = as_tensor("q01"), as_tensor("q99")
        restored = (x + 1.0) / 2.0 * torch.clamp(high - low, min=1e-8) + low
    elif method == "normal":
        restored = x * torch.clamp(as_tensor("std"), min=1e-8) + as_tensor("mean")
    else:
        raise ValueError(f"unknown action_normalization {method!r}; expected 'bounds' or 'normal'")
    return torch.where(mask, restored, x)


# --- Sampling: the three ways to act ---------------------------------------------------------------------------

def _schedule(num_steps: int, shift: float) -> list[tuple[float, float]]:
    """(t, t_next) pairs of an Euler sampler from 1 to 0 with Wan's shift (wamjax.diffusion.flow)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t = (shift * t / (1.0 + (shift - 1.0) * t)).float().tolist()
    return list(zip(t[:-1], t[1:], strict=True))


@torch.no_grad()
def sample(
    model: WorldActionModel,
    context_latents: torch.Tensor,
    text: torch.Tensor,
    proprio: torch.Tensor | None,
    video_noise: torch.Tensor | None,
    action_noise: torch.Tensor | None,
    *,
    mode: str = "joint",
    num_steps: int = 4,
    action_steps: int | None = None,
    shift: float = 1.0,
    actions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euler sampling (no guidance) in one of the three modes of wamjax.diffusion.modes -> (latents
    [B, C, F, H, W] with the context first, actions [B, T_a, A]).

    context_latents [B, C, Fc, H, W] are clean; video_noise [B, C, F - Fc, H, W] and action_noise [B, T_a, A]
    start at t=1. mode "joint": both denoised together (video on num_steps, actions on action_steps; a
    modality whose steps are done is held at t=0). "imagine_then_act": the video first with the actions held at
    their noise (t=1), then the actions from the same noise with that video held clean (t=0).
    "world_model": the video given clean `actions` [B, T_a, A] (t=0); action_noise is unused. A tokens-layout
    export takes and returns latents with a views axis, [B, C, F, V, H, W].
    """
    if mode not in ("joint", "imagine_then_act", "world_model"):
        raise ValueError(f"mode={mode!r}; expected 'joint', 'imagine_then_act' or 'world_model'")
    if mode == "world_model" and actions is None:
        raise ValueError("mode='world_model' needs the clean actions (actions=)")
    if mode != "world_model" and action_noise is None:
        raise ValueError(f"mode={mode!r} needs action_noise")
    b, num_context = context_latents.shape[0], context_latents.shape[2]
    n, m = num_steps, num_steps if action_steps is None else action_steps

    def run(video, acts, video_times, action_times, move_video, move_actions):
        for (tv, tv_next), (ta, ta_next) in zip(video_times, action_times, strict=True):
            t_frames = torch.full((b, video.shape[2]), tv * 1000.0)
            t_frames[:, :num_context] = 0.0
            if not move_video:
                t_frames.zero_()
            v_video, v_actions = model(video, t_frames, text, acts, torch.full((b,), ta * 1000.0), proprio)
            if move_video:
                video = video.clone()
                video[:, :, num_context:] += (tv_next - tv) * v_video[:, :, num_context:]
            if move_actions:
                acts = acts + (ta_next - ta) * v_actions
        return video, acts

    video = torch.cat([context_latents.float(), video_noise.float()], dim=2)
    if mode == "world_model":
        return run(video, actions.float(), _schedule(n, shift), [(0.0, 0.0)] * n, True, False)
    acts = action_noise.float()
    if mode == "imagine_then_act":
        video, _ = run(video, acts, _schedule(n, shift), [(1.0, 1.0)] * n, True, False)
        return run(video, acts, [(0.0, 0.0)] * m, _schedule(m, shift), False, True)
    iterations = max(n, m)
    pad = lambda pairs: pairs + [(0.0, 0.0)] * (iterations - len(pairs))
    return run(video, acts, pad(_schedule(n, shift)), pad(_schedule(m, shift)), True, True)
