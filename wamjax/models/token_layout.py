"""The joint token sequence's static geometry: sizes, modulation groups, attention chunks and copies, rotary angles,
and the (frame, view) token orders of several camera views.

Order: [video | actions | proprio | clean history video | clean history actions | padding] (see `TokenLayout`).
Video tokens are ordered frame-major (f, h, w) as Wan flattens them; several views per latent frame come as
(f, v, h, w): all views of a latent frame are adjacent (so a latent frame's views always share its attention chunk),
and every view reads the frame's time position and the spatial positions of one view.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from wamjax.models.attention_mask import PADDING_CHUNK, AttentionMask
from wamjax.models.config import ModelConfig
from wamjax.models.layers import rope_frequencies


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Static description of the joint token sequence: sizes, group ids, chunk and copy ids, rotary angles.

    Order: [video | actions | proprio (one, or one per chunk) | clean history video | clean history actions |
    padding]. The history
    part exists only in the teacher-forced layout (`teacher_forcing`): it is the clean copy (copy 0) of the
    chunks before the last, while the video and action tokens of chunks >= 1 are the noisy copy (copy 1).
    """

    grid: tuple[int, int, int]  # (frames, height, width) of video tokens after patching
    num_action_tokens: int
    num_proprio_tokens: int
    num_padding_tokens: int
    token_group: np.ndarray  # [S] int32: which modulation group each token reads
    token_chunk: np.ndarray  # [S] int32: attention chunk (a token sees chunks <= its own)
    token_valid: np.ndarray  # [S] bool: False for padding tokens
    rope_angles: np.ndarray  # [S, head_dim // 2] float64
    num_groups: int
    causal: bool
    teacher_forcing: bool = False
    history_frames: int = 0  # patched latent frames 1.. repeated clean in the history part
    num_history_action_tokens: int = 0  # actions 0.. repeated clean in the history part
    token_copy: np.ndarray | None = None  # [S] int32: 0 clean, 1 noisy (teacher forcing); None: one copy
    num_views: int = 1  # camera views per latent frame (tokens view layout), each a (h, w) grid of tokens

    @property
    def num_video_tokens(self) -> int:
        f, h, w = self.grid
        return f * self.num_views * h * w

    @property
    def num_history_video_tokens(self) -> int:
        return self.history_frames * self.num_views * self.grid[1] * self.grid[2]

    @property
    def history_offset(self) -> int:
        """Index of the first history token."""
        return self.num_video_tokens + self.num_action_tokens + self.num_proprio_tokens

    @property
    def length(self) -> int:
        return (self.history_offset + self.num_history_video_tokens + self.num_history_action_tokens
                + self.num_padding_tokens)

    def __hash__(self) -> int:  # numpy fields are fixed by the scalar ones
        return hash((self.grid, self.num_action_tokens, self.num_proprio_tokens, self.num_padding_tokens,
                     self.num_groups, self.causal, self.teacher_forcing, self.history_frames,
                     self.num_history_action_tokens, self.num_views))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenLayout) and hash(self) == hash(other)


def trains_teacher_forced(cfg: ModelConfig) -> bool:
    """True when training sequences hold a clean and a noisy copy of the chunks (chunk-causal models with
    model.history="teacher_forcing")."""
    return cfg.history == "teacher_forcing" and cfg.attention_layout == "chunk_causal"


def latent_frame_chunk(cfg: ModelConfig, num_latent_frames: int) -> np.ndarray:
    """Chunk id per latent frame: frame 0 (the context frame) is chunk 0, then chunks of `chunk_latent_frames`."""
    if cfg.attention_layout == "bidirectional":
        return np.zeros(num_latent_frames, np.int32)
    if cfg.attention_layout != "chunk_causal":
        raise ValueError(
            f"model.attention_layout={cfg.attention_layout!r}; expected 'bidirectional' or 'chunk_causal'"
        )
    f = np.arange(num_latent_frames)
    return np.where(f == 0, 0, 1 + (f - 1) // max(cfg.chunk_latent_frames, 1)).astype(np.int32)


def action_latent_frame(cfg: ModelConfig, num_action_tokens: int) -> np.ndarray:
    """The future latent frame each action token is aligned with (actions[i] moves frame i to i+1)."""
    return (1 + np.arange(num_action_tokens) // cfg.action_frames_per_latent).astype(np.int32)


def history_sizes(cfg: ModelConfig, num_frames: int, num_action_tokens: int) -> tuple[int, int]:
    """(latent frames, action tokens) of the clean history copy in the teacher-forced layout: those of chunks
    1 .. last-1 (chunk 0 is clean already; nothing attends to the last chunk's clean copy)."""
    frame_chunk = latent_frame_chunk(cfg, num_frames)
    last = int(frame_chunk.max()) if num_frames else 0
    frames = int(np.sum((frame_chunk >= 1) & (frame_chunk < last)))
    action_chunk = frame_chunk[np.minimum(action_latent_frame(cfg, num_action_tokens), num_frames - 1)]
    return frames, int(np.sum(action_chunk < last))


def video_rope_angles(cfg: ModelConfig, grid: tuple[int, int, int], num_views: int = 1) -> np.ndarray:
    """Rotary angles [F * V * H * W, head_dim // 2] of a (frames, height, width) token grid of `num_views` views,
    ordered (f, v, h, w), with the head dim split (t, h, w) as Wan splits it."""
    head_dim = cfg.attention_head_dim
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    if max(grid) > cfg.rope_max_seq_len:
        raise ValueError(f"token grid {grid} exceeds model.rope_max_seq_len={cfg.rope_max_seq_len}")
    # Views share positions: a view's tokens are rotated as a lone camera's would be at that frame.
    gf, gh, gw = grid
    ff, _, hh, ww = np.meshgrid(np.arange(gf), np.arange(num_views), np.arange(gh), np.arange(gw), indexing="ij")
    return np.concatenate(
        [
            rope_frequencies(t_dim, ff.reshape(-1), cfg.rope_theta),
            rope_frequencies(h_dim, hh.reshape(-1), cfg.rope_theta),
            rope_frequencies(w_dim, ww.reshape(-1), cfg.rope_theta),
        ],
        axis=-1,
    )


def sequence_token_group(num_frames: int, tokens_per_frame: int, num_action_tokens: int,
                         num_proprio_tokens: int) -> np.ndarray:
    """Modulation group of every token of [video | actions | proprio]: one group per latent frame (all its tokens,
    all its views), one per action token, then one shared by the proprio tokens."""
    return np.concatenate([np.repeat(np.arange(num_frames), tokens_per_frame),
                           num_frames + np.arange(num_action_tokens),
                           np.full(num_proprio_tokens, num_frames + num_action_tokens)])


def make_token_layout(
    cfg: ModelConfig,
    latent_shape: tuple[int, int, int],
    num_action_tokens: int = 0,
    num_proprio_tokens: int = 0,
    pad_to_multiple: int = 1,
    teacher_forcing: bool = False,
    num_views: int = 1,
) -> TokenLayout:
    """Builds the static token layout for latents of (frames, height, width) plus optional action tokens.

    `num_proprio_tokens` is 1 (chunk 0's state) or, for chunk-causal layouts, one per chunk (token k in chunk k:
    the state its actions start from). Groups: one per latent frame (shared by its `num_views` views), then one
    per action token, then one for the proprio tokens (all clean); the teacher-forced layout adds one group for
    its clean history video (all views of each history frame, at the noisy copy's positions) and one for its
    clean history actions (both t=0).
    """
    pt, ph, pw = cfg.patch_size
    frames, height, width = latent_shape
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent shape {latent_shape} is not divisible by patch_size {cfg.patch_size}")
    if teacher_forcing and not trains_teacher_forced(cfg):
        raise ValueError(f"a teacher-forced layout needs model.attention_layout='chunk_causal' and "
                         f"model.history='teacher_forcing'; got {cfg.attention_layout!r}, {cfg.history!r}")
    grid = (frames // pt, height // ph, width // pw)
    gf, gh, gw = grid
    if num_views < 1:
        raise ValueError(f"num_views={num_views}; expected >= 1")
    per_frame = num_views * gh * gw  # tokens of one patched latent frame, all its views
    frame_idx = np.repeat(np.arange(gf), per_frame)
    frame_chunk = latent_frame_chunk(cfg, gf)
    action_frame = np.minimum(action_latent_frame(cfg, num_action_tokens), gf - 1)
    action_chunk = frame_chunk[action_frame]
    num_chunks = int(frame_chunk.max()) + 1 if gf else 1
    if num_proprio_tokens not in (0, 1, num_chunks):
        raise ValueError(f"{num_proprio_tokens} proprio tokens; expected 0, 1 (chunk 0 only) or one per chunk "
                         f"({num_chunks}): set data.proprio_chunk_frames to 4 * model.chunk_latent_frames "
                         f"(chunk-causal models) or 0")
    # Proprio token k belongs to chunk k (k = 0 alone when there is one token).
    proprio_chunk = np.arange(num_proprio_tokens, dtype=np.int32)
    groups = [sequence_token_group(gf, per_frame, num_action_tokens, num_proprio_tokens)]
    chunks = [frame_chunk[frame_idx], action_chunk, proprio_chunk]
    # Only chunk 0 (context frame, its proprio) is clean in the main part; the rest is the noisy copy. The state
    # tokens of chunks >= 1 are clean observations too, but they take the noisy copy's id so that only their own
    # chunk's noisy tokens read them (a clean id would hide them from their chunk: noisy chunk k sees clean
    # chunks < k); the clean history copy has none, as the KV cache caches none.
    copies = [(frame_chunk[frame_idx] > 0).astype(np.int32), np.ones(num_action_tokens, np.int32),
              (proprio_chunk > 0).astype(np.int32)]
    video_angles = video_rope_angles(cfg, grid, num_views)
    angles = [video_angles, np.zeros((num_action_tokens + num_proprio_tokens, video_angles.shape[1]))]
    num_groups = gf + num_action_tokens + (1 if num_proprio_tokens else 0)
    history_frames = history_actions = 0
    if teacher_forcing:
        history_frames, history_actions = history_sizes(cfg, gf, num_action_tokens)
        hist_idx = 1 + np.repeat(np.arange(history_frames), per_frame)
        groups += [np.full(len(hist_idx), num_groups), np.full(history_actions, num_groups + 1)]
        chunks += [frame_chunk[hist_idx], action_chunk[:history_actions]]
        copies += [np.zeros(len(hist_idx) + history_actions, np.int32)]
        angles += [video_angles[per_frame : per_frame * (1 + history_frames)],
                   np.zeros((history_actions, video_angles.shape[1]))]
        num_groups += 1 + (1 if history_actions else 0)
    valid_len = sum(len(c) for c in chunks)
    num_padding = (-valid_len) % pad_to_multiple
    groups.append(np.zeros(num_padding, np.int64))
    chunks.append(np.full(num_padding, PADDING_CHUNK, np.int32))
    copies.append(np.zeros(num_padding, np.int32))
    angles.append(np.zeros((num_padding, video_angles.shape[1])))
    return TokenLayout(
        grid=grid,
        num_action_tokens=num_action_tokens,
        num_proprio_tokens=num_proprio_tokens,
        num_padding_tokens=num_padding,
        token_group=np.concatenate(groups).astype(np.int32),
        token_chunk=np.concatenate(chunks).astype(np.int32),
        token_valid=np.arange(valid_len + num_padding) < valid_len,
        rope_angles=np.concatenate(angles, axis=0),
        num_groups=num_groups,
        causal=cfg.attention_layout == "chunk_causal",
        teacher_forcing=teacher_forcing,
        history_frames=history_frames,
        num_history_action_tokens=history_actions,
        token_copy=np.concatenate(copies).astype(np.int32) if teacher_forcing else None,
        num_views=num_views,
    )


def layout_attention_mask(layout: TokenLayout) -> AttentionMask | None:
    """The layout's self-attention mask as per-token ids (what the kernels take), or None when every token
    sees every token."""
    if layout.teacher_forcing:
        return AttentionMask.create(layout.token_chunk, layout.token_chunk, kv_valid=layout.token_valid,
                                    q_copy=layout.token_copy, kv_copy=layout.token_copy, rule="teacher_forcing")
    if not layout.causal and layout.num_padding_tokens == 0:
        return None
    return AttentionMask.create(layout.token_chunk, kv_valid=layout.token_valid)


def views_into_batch(latents: jax.Array) -> jax.Array:
    """Multi-view latents or frames [B, T, V, ...] -> [B * V, T, ...], view-major within each example (what the
    per-view VAE, patch embedding and unpatchify run on)."""
    b, t, v = latents.shape[:3]
    return jnp.swapaxes(latents, 1, 2).reshape(b * v, t, *latents.shape[3:])


def views_out_of_batch(x: jax.Array, views: int) -> jax.Array:
    """Inverse of `views_into_batch`: [B * V, T, ...] -> [B, T, V, ...]."""
    bv, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(bv // views, views, t, *x.shape[2:]), 1, 2)


def view_tokens_by_frame(tokens: jax.Array, views: int, frames: int) -> jax.Array:
    """Per-view token sequences [B * V, F * N, D] -> one sequence [B, F * V * N, D] ordered (f, v, n)."""
    bv, s, d = tokens.shape
    x = tokens.reshape(bv // views, views, frames, s // frames, d)
    return x.transpose(0, 2, 1, 3, 4).reshape(bv // views, s * views, d)


def view_tokens_by_view(tokens: jax.Array, views: int, frames: int) -> jax.Array:
    """Inverse of `view_tokens_by_frame`: [B, F * V * N, D] -> [B * V, F * N, D]."""
    b, s, d = tokens.shape
    x = tokens.reshape(b, frames, views, s // (frames * views), d)
    return x.transpose(0, 2, 1, 3, 4).reshape(b * views, s // views, d)
