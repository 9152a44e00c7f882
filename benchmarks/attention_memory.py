"""Compiled temporary memory and CPU time of the attention kernels, forward and forward+backward.

  python benchmarks/attention_memory.py                         # S=8192 memory, times at S=1024,2048,4096
  python benchmarks/attention_memory.py --memory_length=16384 --time_lengths=2048 --heads=12

Memory is XLA's `memory_analysis()` of the compiled program (temporaries, bytes per device): nothing runs.
Times are medians of `--repeats` runs on the local backend after one warm-up call. The shapes are one
attention call of a Wan-1.3B-like layer: batch 1, `--heads` heads of 128, float32, a chunk-causal mask with
`--chunk` tokens per chunk and the last 1% of tokens padding.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from wamjax.models import attention as attention_lib
from wamjax.models.attention_mask import PADDING_CHUNK, AttentionMask

_KERNELS = flags.DEFINE_list("kernels", ["dot_product", "blockwise"], "Kernels to compare.")
_MEMORY_LENGTH = flags.DEFINE_integer("memory_length", 8192, "Sequence length of the memory rows.")
_TIME_LENGTHS = flags.DEFINE_list("time_lengths", ["1024", "2048", "4096"], "Sequence lengths of the time rows.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads (head_dim 128).")
_CHUNK = flags.DEFINE_integer("chunk", 880, "Tokens per chunk of the chunk-causal mask.")
_BLOCK = flags.DEFINE_list("block", ["512", "512"], "blockwise block_q, block_kv.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per row.")


def _inputs(length: int):
    shape = jax.ShapeDtypeStruct((1, length, _HEADS.value, 128), jnp.float32)
    valid = np.arange(length) < length - length // 100
    chunk = np.where(valid, np.arange(length) // _CHUNK.value, PADDING_CHUNK)
    return shape, AttentionMask.create(chunk, kv_valid=valid)


def _programs(kernel: str, mask: AttentionMask):
    block_q, block_kv = (int(b) for b in _BLOCK.value)
    fn = attention_lib.get_attention(kernel, attention_lib.KernelOptions(block_q, block_kv))
    forward = jax.jit(lambda q, k, v: fn(q, k, v, mask))
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask) ** 2)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return {"fwd": forward, "fwd+bwd": backward}


def _temp_bytes(program, shape) -> int:
    return int(program.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes)


def _median_seconds(program, length: int) -> float:
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=(1, length, _HEADS.value, 128)), jnp.float32) for _ in range(3)]
    jax.block_until_ready(program(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv):
    del argv
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), heads {_HEADS.value} x 128, "
          f"float32, chunk {_CHUNK.value}, blockwise blocks {_BLOCK.value}")
    length = _MEMORY_LENGTH.value
    shape, mask = _inputs(length)
    print(f"\n## Compiled temporary bytes at S={length}\n")
    print("| kernel | pass | temp MiB | vs dot_product |")
    print("|---|---|---|---|")
    reference = {}
    for kernel in _KERNELS.value:
        for name, program in _programs(kernel, mask).items():
            size = _temp_bytes(program, shape)
            reference.setdefault(name, size)
            print(f"| {kernel} | {name} | {size / 2**20:,.1f} | {size / reference[name]:.3f} |")
    print("\n## CPU time (median seconds)\n")
    print("| S | kernel | fwd s | fwd+bwd s |")
    print("|---|---|---|---|")
    for length in (int(s) for s in _TIME_LENGTHS.value if s):
        _, mask = _inputs(length)
        for kernel in _KERNELS.value:
            programs = _programs(kernel, mask)
            fwd, bwd = (_median_seconds(programs[n], length) for n in ("fwd", "fwd+bwd"))
            print(f"| {length} | {kernel} | {fwd:.3f} | {bwd:.3f} |")


if __name__ == "__main__":
    app.run(main)
