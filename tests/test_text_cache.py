"""Instruction-embedding cache: UMT5 embedding job, file format, lookups, the CLI over OXE-format datasets."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipelines import make_oxe_like
from data_pipelines.sources.rlds import EpisodeSource
from wamjax.jobs.text_cache import build_text_cache, load_encoder, make_tiny_umt5
from wamjax.models.text import TextEmbeddingCache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTIONS = ["pick up the red cube", "open the drawer", "put the spoon in the pot", "héllo wörld"]


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    return make_tiny_umt5(str(tmp_path_factory.mktemp("tiny_umt5")), d_model=32, seed=0)


def reference_embedding(encoder_dir: str, text: str, max_length: int) -> np.ndarray:
    """Wan's text context for one instruction: padded to max_length, real tokens kept, the rest zeroed."""
    model, tokenizer = load_encoder(encoder_dir)
    tokens = tokenizer([text], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens).last_hidden_state[0].numpy()
    return hidden * tokens["attention_mask"][0].numpy()[:, None]


def test_cache_matches_encoder_and_handles_empty_and_misses(tiny_encoder_dir, tmp_path):
    out = str(tmp_path / "cache.safetensors")
    # Duplicates and the empty instruction are not stored.
    count = build_text_cache(
        [*INSTRUCTIONS, INSTRUCTIONS[0], ""], tiny_encoder_dir, out, max_length=16, dtype=np.float32
    )
    assert count == len(INSTRUCTIONS)
    cache = TextEmbeddingCache.load(out)
    assert (len(cache), cache.text_dim, cache.max_length) == (4, 32, 16)

    batch = np.array([INSTRUCTIONS[1], "", INSTRUCTIONS[3]])  # the batch contract's '<U..' array
    embeddings = cache.lookup(batch)
    assert embeddings.shape == (3, 16, 32) and embeddings.dtype == np.float32
    for row, text in ((0, INSTRUCTIONS[1]), (2, INSTRUCTIONS[3])):
        np.testing.assert_allclose(embeddings[row], reference_embedding(tiny_encoder_dir, text, 16), atol=1e-5)
    # Real tokens (bytes + </s>) then zero padding; "" is the all-zero null condition.
    lengths = cache.lengths(batch)
    assert lengths.tolist() == [len("open the drawer") + 1, 0, len("héllo wörld".encode()) + 1]
    assert np.all(np.abs(embeddings[0, : lengths[0]]).sum(-1) > 0)
    assert np.all(embeddings[0, lengths[0] :] == 0)
    assert np.all(embeddings[1] == 0) and np.array_equal(embeddings[1], cache.null_embedding())

    with pytest.raises(KeyError, match="'close the door' is not in text cache .*cache.safetensors"):
        cache.lookup(["close the door"])

    # Grain workers get a pickled copy; it reopens the file lazily.
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.lookup(batch), embeddings)


def test_long_instruction_is_truncated_to_max_length(tiny_encoder_dir, tmp_path):
    out = str(tmp_path / "cache.safetensors")
    long_text = "stack the blocks " * 4
    build_text_cache([long_text], tiny_encoder_dir, out, max_length=8)
    cache = TextEmbeddingCache.load(out)
    embedding = cache.lookup([long_text])
    assert embedding.shape == (1, 8, 32) and cache.lengths([long_text]).tolist() == [8]
    # float16 storage: within half-precision rounding of the float32 reference.
    np.testing.assert_allclose(embedding[0], reference_embedding(tiny_encoder_dir, long_text, 8), atol=5e-3)


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "other.safetensors")
    save_file({"weights": np.zeros(3, np.float32)}, path)
    with pytest.raises(ValueError, match="is not a text cache"):
        TextEmbeddingCache.load(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        TextEmbeddingCache.load(str(tmp_path / "missing.safetensors"))


def test_cli_collects_oxe_and_file_instructions(tiny_encoder_dir, tmp_path):
    data_dir = str(tmp_path / "oxe")
    make_oxe_like.make_datasets(data_dir, ["bridge"], episodes=3, seed=2, image_size=(16, 16))
    oxe_instructions = {EpisodeSource(data_dir, "bridge")[i].instruction for i in range(3)}
    extra = tmp_path / "instructions.txt"
    extra.write_text("wipe the table\n\n", encoding="utf-8")
    out = str(tmp_path / "cache.safetensors")
    subprocess.run(
        [
            sys.executable, "-m", "wamjax.jobs.text_cache", f"--encoder={tiny_encoder_dir}",
            "--datasets=bridge", f"--data_dir={data_dir}", f"--instructions_file={extra}",
            f"--out={out}", "--max_length=24",
        ],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    cache = TextEmbeddingCache.load(out)
    assert set(cache.instructions) == oxe_instructions | {"wipe the table"}
    assert cache.lookup(sorted(oxe_instructions)).shape == (len(oxe_instructions), 24, 32)
