"""Offline job: embed every unique language instruction of a data mix with a UMT5 encoder, into one cache file.

    python -m wamjax.jobs.text_cache --encoder=PATH_OR_CONFIG --datasets=bridge,taco_play \
        --data_dir=DIR --out=text_cache.safetensors [--instructions_file=FILE] [--max_length=512]

`--encoder` is a folder holding a transformers UMT5 encoder and its tokenizer (e.g. Wan's `text_encoder` +
`tokenizer`, given as `--encoder=DIR/text_encoder --tokenizer=DIR/tokenizer`), a folder or file with only a
UMT5 `config.json` (random weights, for pipelines tests), or `tiny` / `tiny:D` (a random tiny encoder of width
D with an offline byte-level tokenizer; the tiny model configs use D = 32). The file format is described in
`wamjax.models.text`; the trainer reads it with `TextEmbeddingCache.load(path).lookup(batch["instruction"])`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from data_pipelines.sources.video import VideoClipSource
from wamjax.models.text import CACHE_FORMAT, NULL_INSTRUCTION

WAN_TEXT_LENGTH = 512  # Wan 2.1's text context length (UMT5-XXL tokens)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def make_byte_tokenizer() -> Any:
    """An offline tokenizer covering any text: one token per UTF-8 byte, T5-style `</s>` appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_tiny_umt5(out_dir: str, d_model: int = 32, seed: int = 0) -> str:
    """Saves a random tiny UMT5 encoder and the byte tokenizer to `out_dir` (save_pretrained); returns it."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = make_byte_tokenizer()
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=max(d_model // 4, 4),
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    UMT5EncoderModel(config).eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_encoder(encoder: str, tokenizer: str | None = None, device: str = "cpu", seed: int = 0) -> tuple[Any, Any]:
    """(UMT5EncoderModel in eval mode on `device`, tokenizer) from a path, a config, or `tiny[:D]`."""
    import torch
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    if encoder == "tiny" or encoder.startswith("tiny:"):
        d_model = int(encoder.partition(":")[2] or 32)
        import tempfile

        folder = make_tiny_umt5(tempfile.mkdtemp(prefix="tiny_umt5_"), d_model=d_model, seed=seed)
        return load_encoder(folder, tokenizer, device, seed)
    if not os.path.exists(encoder):
        raise FileNotFoundError(f"--encoder={encoder}: no such folder or config file (nothing is downloaded)")
    folder = encoder if os.path.isdir(encoder) else os.path.dirname(encoder)
    has_weights = os.path.isdir(encoder) and any(os.path.exists(os.path.join(encoder, f)) for f in _WEIGHT_FILES)
    if has_weights:
        model = UMT5EncoderModel.from_pretrained(encoder)
    else:
        config_path = encoder if os.path.isfile(encoder) else os.path.join(encoder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"--encoder={encoder} holds neither weights {list(_WEIGHT_FILES)} nor config.json")
        logging.warning("%s has no weights: embedding with a RANDOM UMT5 encoder (seed %d)", encoder, seed)
        torch.manual_seed(seed)
        model = UMT5EncoderModel(UMT5Config.from_pretrained(config_path))
    tokenizer_path = tokenizer or folder
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no tokenizer found in {tokenizer_path}; pass --tokenizer=DIR (Wan checkpoints keep it in tokenizer/)"
        ) from e
    return model.eval().to(device), tok


def embed_instructions(
    instructions: Sequence[str], model: Any, tokenizer: Any, max_length: int, batch_size: int = 32
) -> list[np.ndarray]:
    """Per instruction, the encoder outputs of its real tokens [n_tokens, d_model] (n_tokens <= max_length)."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    out: list[np.ndarray | None] = [None] * len(instructions)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # Padding to the longest in the batch, not to max_length: with the attention mask the real tokens'
        # outputs are the same, and sorting by length keeps the padding small.
        tokens = tokenizer(
            [instructions[i] for i in chunk],
            padding="longest",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            ).last_hidden_state
        hidden = hidden.float().cpu().numpy()
        lengths = tokens["attention_mask"].sum(dim=1).tolist()
        for row, i in enumerate(chunk):
            out[i] = hidden[row, : int(lengths[row])]
    return out  # type: ignore[return-value]


def write_cache(
    out_path: str,
    instructions: Sequence[str],
    embeddings: Sequence[np.ndarray],
    *,
    max_length: int,
    encoder: str,
    text_dim: int | None = None,
    dtype: Any = np.float16,
) -> None:
    """Writes the packed cache file (format in `wamjax.models.text`) atomically."""
    from safetensors.numpy import save_file

    if len(instructions) != len(embeddings):
        raise ValueError(f"{len(instructions)} instructions but {len(embeddings)} embeddings")
    widths = {e.shape[1] for e in embeddings} | ({text_dim} if text_dim is not None else set())
    if len(widths) != 1:
        raise ValueError(f"embedding widths {sorted(widths)}; expected one text_dim (pass text_dim when empty)")
    text_dim = widths.pop()
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in embeddings])]).astype(np.int64)
    packed = np.concatenate(embeddings).astype(dtype) if embeddings else np.zeros((0, text_dim), dtype)
    metadata = {
        "format": CACHE_FORMAT,
        "instructions": json.dumps(list(instructions), ensure_ascii=False),
        "text_dim": str(text_dim),
        "max_length": str(max_length),
        "encoder": encoder,
        "null_embedding": "zeros",
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp"
    save_file({"embeddings": packed, "offsets": offsets}, tmp, metadata=metadata)
    os.replace(tmp, out_path)


def build_text_cache(
    instructions: Iterable[str],
    encoder: str | tuple[Any, Any],
    out_path: str,
    max_length: int = WAN_TEXT_LENGTH,
    *,
    tokenizer: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: Any = np.float16,
) -> int:
    """Embeds the unique non-empty `instructions` and writes the cache to `out_path`; returns how many.

    `encoder` is anything `load_encoder` accepts, or an already loaded (model, tokenizer) pair.
    The empty instruction is not stored: the cache maps it to the all-zero null embedding.
    """
    unique = sorted({str(t) for t in instructions} - {NULL_INSTRUCTION})
    if isinstance(encoder, tuple):
        (model, tok), name = encoder, type(encoder[0]).__name__
    else:
        (model, tok), name = load_encoder(encoder, tokenizer, device), encoder
    logging.info("Embedding %d unique instructions with %s (max_length %d)", len(unique), name, max_length)
    embeddings = embed_instructions(unique, model, tok, max_length, batch_size)
    write_cache(
        out_path, unique, embeddings, max_length=max_length, encoder=name, text_dim=model.config.d_model, dtype=dtype
    )
    return len(unique)


def collect_instructions(
    datasets: Sequence[str] = (),
    data_dir: str = "",
    *,
    split: str = "train",
    instructions_file: str | None = None,
    video_shards: str | None = None,
) -> list[str]:
    """Sorted unique instructions of the OXE `datasets` (via the registry), an instructions file
    (one per line) and video-clip shards (their captions)."""
    found: set[str] = set()
    if datasets:
        from data_pipelines.sources.episodes import open_episodes  # TFDS and TensorFlow: only for robot datasets

        for name in datasets:
            source = open_episodes(data_dir, name, split)
            before = len(found)
            for index in range(len(source)):
                found.add(source[index].instruction)
            logging.info("%s: %d episodes, %d new instructions", name, len(source), len(found) - before)
    if instructions_file:
        with open(instructions_file, encoding="utf-8") as f:
            found.update(line.rstrip("\n") for line in f)
    if video_shards:
        clips = VideoClipSource(video_shards)
        found.update(clips[i]["caption"] for i in range(len(clips)))
    return sorted(found)


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    if not FLAGS.out:
        raise ValueError("--out is required: the cache file to write")
    datasets = [d for d in FLAGS.datasets or [] if d]
    if not (datasets or FLAGS.instructions_file or FLAGS.video_shards):
        raise ValueError("nothing to embed: give --datasets (with --data_dir), --instructions_file or --video_shards")
    instructions = collect_instructions(
        datasets,
        FLAGS.data_dir,
        split=FLAGS.split,
        instructions_file=FLAGS.instructions_file,
        video_shards=FLAGS.video_shards,
    )
    count = build_text_cache(
        instructions,
        FLAGS.encoder,
        FLAGS.out,
        FLAGS.max_length,
        tokenizer=FLAGS.tokenizer,
        batch_size=FLAGS.batch_size,
        device=FLAGS.device,
        dtype=np.dtype(FLAGS.dtype),
    )
    print(f"Wrote {count} instruction embeddings to {FLAGS.out}")


if __name__ == "__main__":
    from absl import app, flags

    # Flags are defined only when run as a script so that importing several CLI modules does not clash.
    flags.DEFINE_string("encoder", None, "UMT5 encoder folder, a UMT5 config.json (random weights), or tiny[:D].")
    flags.DEFINE_string("tokenizer", None, "Tokenizer folder; default: the encoder's folder.")
    flags.DEFINE_list("datasets", [], "OXE dataset names (the data registry) to collect instructions from.")
    flags.DEFINE_string("data_dir", "", "Directory holding the TFDS datasets.")
    flags.DEFINE_string("split", "train", "Dataset split.")
    flags.DEFINE_string("instructions_file", None, "Text file with one instruction per line.")
    flags.DEFINE_string("video_shards", None, "Video clip shards (directory or glob) whose captions to embed.")
    flags.DEFINE_string("out", None, "Cache file to write (.safetensors).")
    flags.DEFINE_integer("max_length", WAN_TEXT_LENGTH, "Text tokens per instruction (Wan: 512).")
    flags.DEFINE_integer("batch_size", 32, "Instructions per encoder call.")
    flags.DEFINE_string("device", "cpu", "torch device, e.g. cpu or cuda.")
    flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Storage dtype of the embeddings.")
    flags.mark_flag_as_required("encoder")
    app.run(main)
