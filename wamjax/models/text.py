"""Text conditioning from a precomputed instruction-embedding cache (written by `wamjax.jobs.text_cache`).

The cache file is safetensors:
  * `embeddings` [total_tokens, text_dim]: every instruction's real-token encoder outputs, packed back to back;
  * `offsets` int64 [N + 1]: instruction i owns rows offsets[i]:offsets[i + 1];
  * metadata: `format`, `instructions` (JSON list, row order), `text_dim`, `max_length`, `encoder`.
`lookup` rebuilds Wan's text context: the real tokens' embeddings followed by zeros up to `max_length`
(diffusers' WanPipeline does the same). The empty instruction "" is the classifier-free-guidance null
condition and maps to an all-zero context. That is our training choice: Wan itself encodes its negative
prompt with T5; an all-zero context needs no encoder at inference and is what caption dropout trains.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from typing import Any

import ml_collections
import numpy as np
from absl import logging

CACHE_FORMAT = "wamjax.text_cache.v1"
NULL_INSTRUCTION = ""


class TextEmbeddingCache:
    """Instruction -> [max_length, text_dim] embedding lookups over one cache file, read lazily from disk."""

    def __init__(self, path: str, instructions: list[str], text_dim: int, max_length: int, encoder: str):
        self.path = path
        self.instructions = instructions
        self.text_dim = text_dim
        self.max_length = max_length
        self.encoder = encoder
        self._row = {text: i for i, text in enumerate(instructions)}
        if len(self._row) != len(instructions):
            raise ValueError(f"text cache {path} lists an instruction more than once")
        self._file: Any = None
        self._offsets: np.ndarray | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextEmbeddingCache:
        """Opens a cache file and reads its index; embeddings are read per lookup."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"text cache {path} does not exist; build it with `python -m wamjax.jobs.text_cache`"
            )
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        if meta.get("format") != CACHE_FORMAT or not {"embeddings", "offsets"} <= keys:
            raise ValueError(
                f"{path} is not a text cache: format={meta.get('format')!r}, tensors {sorted(keys)}; "
                f"expected format {CACHE_FORMAT!r} with tensors ['embeddings', 'offsets']"
            )
        return cls(
            path,
            json.loads(meta["instructions"]),
            text_dim=int(meta["text_dim"]),
            max_length=int(meta["max_length"]),
            encoder=meta.get("encoder", ""),
        )

    def __len__(self) -> int:
        return len(self.instructions)

    def __contains__(self, instruction: str) -> bool:
        return instruction == NULL_INSTRUCTION or instruction in self._row

    def __getstate__(self) -> dict[str, Any]:
        # The open file handle does not pickle (Grain workers); each process reopens it.
        return self.__dict__ | {"_file": None, "_offsets": None}

    def _open(self) -> None:
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(self.path, framework="numpy")
            self._offsets = self._file.get_tensor("offsets")

    def null_embedding(self, dtype: Any = np.float32) -> np.ndarray:
        """The classifier-free-guidance null condition: zeros [max_length, text_dim]."""
        return np.zeros((self.max_length, self.text_dim), dtype)

    def lengths(self, instructions: Iterable[str] | np.ndarray) -> np.ndarray:
        """Number of real (non-padding) tokens per instruction; 0 for the empty instruction."""
        self._open()
        rows = [self._row_of(text) for text in _as_list(instructions)]
        return np.asarray([0 if r is None else int(self._offsets[r + 1] - self._offsets[r]) for r in rows], np.int32)

    def lookup(self, instructions: Iterable[str] | np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Embeddings [B, max_length, text_dim] of a batch of instructions (zero-padded after the real tokens)."""
        self._open()
        texts = _as_list(instructions)
        out = np.zeros((len(texts), self.max_length, self.text_dim), dtype)
        embeddings = self._file.get_slice("embeddings")
        for b, text in enumerate(texts):
            row = self._row_of(text)
            if row is None:
                continue
            start, end = int(self._offsets[row]), int(self._offsets[row + 1])
            out[b, : end - start] = embeddings[start:end]
        return out

    def _row_of(self, text: str) -> int | None:
        if text == NULL_INSTRUCTION:
            return None
        try:
            return self._row[text]
        except KeyError:
            raise KeyError(
                f"instruction {text!r} is not in text cache {self.path} ({len(self)} instructions); rebuild "
                "the cache over the datasets you train on with `python -m wamjax.jobs.text_cache`"
            ) from None


def _as_list(instructions: Iterable[str] | np.ndarray) -> list[str]:
    if isinstance(instructions, str):
        raise TypeError(f"expected a batch of instructions, got the single string {instructions!r}")
    if isinstance(instructions, np.ndarray):
        instructions = instructions.reshape(-1).tolist()
    return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in instructions]


class TextEmbedder:
    """Instruction strings -> text-encoder states [B, L, text_dim], from a UMT5 cache or synthetic hashing.

    The synthetic embedder (text.cache="") gives each distinct instruction a fixed random embedding; it is for
    CPU smoke runs without an encoder at hand and says so in the log.
    """

    def __init__(self, text_config: ml_collections.ConfigDict, text_dim: int):
        self.max_length = int(text_config.max_length)
        self.text_dim = text_dim
        self.cache = None
        if text_config.cache:
            self.cache = TextEmbeddingCache.load(text_config.cache)
            logging.info("text: embeddings from cache %s", text_config.cache)
        else:
            logging.info("text: SYNTHETIC hashed instruction embeddings (text.cache is empty)")

    def __call__(self, instructions: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            emb = np.asarray(self.cache.lookup([str(s) for s in instructions]), np.float32)
            if emb.shape[-1] != self.text_dim:
                raise ValueError(f"text cache has dim {emb.shape[-1]}; model.text_dim={self.text_dim}")
            return _fit_length(emb, self.max_length)
        out = np.zeros((len(instructions), self.max_length, self.text_dim), np.float32)
        for i, text in enumerate(instructions):
            text = str(text)
            if text:  # the empty instruction is the null (CFG) embedding
                rng = np.random.default_rng(zlib.crc32(text.encode()))
                n = min(self.max_length, max(1, len(text.split())))
                out[i, :n] = rng.standard_normal((n, self.text_dim)).astype(np.float32)
        return out


def _fit_length(emb: np.ndarray, length: int) -> np.ndarray:
    if emb.shape[1] >= length:
        return emb[:, :length]
    return np.pad(emb, ((0, 0), (0, length - emb.shape[1]), (0, 0)))
