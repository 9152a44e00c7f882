"""wamjax vs diffusers' WanTransformer3DModel: forward+backward on the same weights and inputs, on CPU.

  python benchmarks/side_by_side.py                           # 6 layers, 512 wide, ~300 to ~5k tokens
  python benchmarks/side_by_side.py --attention=dot_product   # any kernel of the model.attention registry
  python benchmarks/side_by_side.py --tokens=320,1280 --repeats=2 --profile_tokens=1280
  python benchmarks/side_by_side.py --heads=2 --head_dim=64 --layers=4 --in_channels=48 --frames=4 \
      --tokens=256 --text_tokens=8                            # the lab model's shapes (configs/lab.py)

A random diffusers model is built, its weights are imported into wamjax (wamjax.checkpoint.wan_import), and both
run forward + backward (gradients of the mean squared velocity w.r.t. every parameter) on the same latents,
timesteps and text embeddings: torch eager, wamjax jitted (compile excluded, reported apart). Both are pinned
to the same CPU cores and thread count. `--profile_tokens` also times one layer's self-attention kernel alone
(forward + backward, both libraries), to say how much of the gap is attention.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

_THREADS = 2
for _arg in sys.argv[1:]:  # before jax/torch start their thread pools
    if _arg.startswith("--threads="):
        _THREADS = int(_arg.split("=", 1)[1])
# XLA's CPU thread pool and torch's intra-op pool both follow the cores the process may run on.
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

_ATTENTION = flags.DEFINE_string("attention", "auto", "wamjax kernel (model.attention; auto: blockwise on CPU).")
_TOKENS = flags.DEFINE_list("tokens", ["320", "1280", "2880", "5120"], "Video token counts (5 latent frames each).")
_LAYERS = flags.DEFINE_integer("layers", 6, "Transformer blocks.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads (512 wide with 4 of --head_dim 128).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Attention head width (the lab model's: 64).")
_CHANNELS = flags.DEFINE_integer("in_channels", 16, "Latent channels (Wan VAE 16; the lab's pixel patches 48).")
_FRAMES = flags.DEFINE_integer("frames", 5, "Latent frames of the token grid (--tokens = frames x n^2).")
_TEXT = flags.DEFINE_integer("text_tokens", 64, "Text tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per size (median), after one warm-up.")
_THREADS_FLAG = flags.DEFINE_integer("threads", 2, "CPU cores and threads for both libraries.")
_PROFILE = flags.DEFINE_integer("profile_tokens", 0, "Also time one layer's attention alone at this size.")

def _model_dims() -> dict:
    dim = _HEADS.value * _HEAD_DIM.value
    return dict(patch_size=(1, 2, 2), num_attention_heads=_HEADS.value, attention_head_dim=_HEAD_DIM.value,
                in_channels=_CHANNELS.value, out_channels=_CHANNELS.value, text_dim=512, freq_dim=256, ffn_dim=4 * dim,
                num_layers=_LAYERS.value, rope_max_seq_len=1024)


def _latent_hw(tokens: int) -> tuple[int, int]:
    frames = _FRAMES.value
    per_frame = tokens // frames
    side = int(round(per_frame ** 0.5))
    if frames * side * side != tokens:
        raise ValueError(f"--tokens={tokens}: expected {frames} x n^2 tokens (--frames={frames})")
    return 2 * side, 2 * side


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _build(dims: dict):
    from diffusers import WanTransformer3DModel

    from wamjax.checkpoint.wan_import import import_diffusers_wan
    from wamjax.models.config import ModelConfig

    torch.manual_seed(0)
    reference = WanTransformer3DModel(**dims).train()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = ModelConfig.from_dict({**dims, "attention": _ATTENTION.value})
    _, params = import_diffusers_wan(reference.state_dict(), cfg)
    return reference, cfg, jax.tree.map(jnp.asarray, params)


def _time_size(reference, cfg, params, tokens: int) -> dict:
    from wamjax.models import wam

    h, w = _latent_hw(tokens)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, _FRAMES.value, h, w, _CHANNELS.value)).astype(np.float32)
    timestep = np.array([500.0], np.float32)
    text = rng.standard_normal((1, _TEXT.value, 512)).astype(np.float32)

    def jax_loss(p):
        return jnp.mean(jnp.square(wam.dit_forward(cfg, p, latents, timestep, text)))

    grad = jax.jit(jax.value_and_grad(jax_loss))
    start = time.perf_counter()
    jax.block_until_ready(grad(params))
    compile_s = time.perf_counter() - start
    jax_s = _median_seconds(lambda: jax.block_until_ready(grad(params)), _REPEATS.value)

    t_latents = torch.from_numpy(latents).permute(0, 4, 1, 2, 3).contiguous()
    t_time, t_text = torch.from_numpy(timestep), torch.from_numpy(text)

    def torch_step():
        reference.zero_grad(set_to_none=True)
        out = reference(t_latents, t_time, t_text, return_dict=False)[0]
        loss = torch.mean(torch.square(out))
        loss.backward()
        return loss

    torch_loss = float(torch_step().detach())  # warm-up
    torch_s = _median_seconds(torch_step, _REPEATS.value)
    jax_value = float(grad(params)[0])
    return dict(tokens=tokens, latent=f"{_FRAMES.value}x{h}x{w}", jax_s=jax_s, torch_s=torch_s, compile_s=compile_s,
                loss_gap=abs(jax_value - torch_loss) / abs(torch_loss))


def _attention_alone(tokens: int) -> tuple[float, float]:
    """One layer's self-attention kernel, forward + backward: (wamjax kernel s, torch SDPA s)."""
    from wamjax.models.attention import get_attention, resolve_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, tokens, _HEADS.value, _HEAD_DIM.value)).astype(np.float32) for _ in range(3))
    kernel = get_attention(resolve_attention(_ATTENTION.value, jax.default_backend(), "float32"))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v)), argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    jax_s = _median_seconds(lambda: jax.block_until_ready(grad(q, k, v)), _REPEATS.value)

    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def torch_step():
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv).sum().backward()

    torch_step()
    return jax_s, _median_seconds(torch_step, _REPEATS.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    torch.set_num_threads(_THREADS_FLAG.value)
    dims = _model_dims()
    reference, cfg, params = _build(dims)
    print(f"# {dims['num_layers']} layers, {cfg.dim} wide ({dims['num_attention_heads']} heads x {_HEAD_DIM.value}), "
          f"ffn {dims['ffn_dim']}, {_TEXT.value} text tokens, batch 1, float32; forward + backward of all params")
    print(f"# wamjax {_ATTENTION.value!r} attention, jitted (jax {jax.__version__}); diffusers eager "
          f"(torch {torch.__version__}); {_THREADS_FLAG.value} threads pinned to cores "
          f"{sorted(os.sched_getaffinity(0))}")
    print("| video tokens | latents | wamjax s | diffusers s | diffusers / wamjax | wamjax compile s | loss gap |")
    print("|---|---|---|---|---|---|---|")
    for tokens in (int(t) for t in _TOKENS.value if t):
        r = _time_size(reference, cfg, params, tokens)
        print(f"| {r['tokens']:,} | {r['latent']} | {r['jax_s']:.3f} | {r['torch_s']:.3f} | "
              f"{r['torch_s'] / r['jax_s']:.2f}x | {r['compile_s']:.1f} | {r['loss_gap']:.1e} |", flush=True)
    if _PROFILE.value:
        jax_s, torch_s = _attention_alone(_PROFILE.value)
        print(f"\n# one layer's self-attention alone at {_PROFILE.value:,} tokens (forward + backward): "
              f"wamjax {_ATTENTION.value} {jax_s:.3f} s, torch SDPA {torch_s:.3f} s; "
              f"x{_LAYERS.value} layers: {_LAYERS.value * jax_s:.2f} s vs {_LAYERS.value * torch_s:.2f} s")


if __name__ == "__main__":
    app.run(main)
