"""Latency per action chunk of `wamjax.inference.Policy.infer` (VAE encode of the context frame + sampling).

    python benchmarks/inference_latency.py [--sizes=tiny] [--steps=1,4,8] [--repeats=20]
    python benchmarks/inference_latency.py --sizes=wan1.3b,wan14b --dtype=bfloat16 --attention=cudnn  # a GPU

Random weights (latency does not depend on them), the config's clip shape and VAE (`configs/wam.py`), batch 1,
actions only (the sampler stops once the action chunk is clean). Each row is one few-step setting: video
steps, action steps, CFG scale and whether CFG is batched with the conditional pass. A second table breaks each
row's chunk into the stages every server reply carries as `policy_timing` (medians over the repeats; see
`wamjax.inference.timing`): text encoding, image/VAE encoding, KV prefill, the denoising iterations (each one's
median), decode, and the total.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from wamjax import config_files
from wamjax.diffusion.sampler import SamplerOptions
from wamjax.inference.policy import Policy
from wamjax.inference.timing import STAGES
from wamjax.models.config import model_config_from_run
from wamjax.models.wam import init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(size: str, dtype: str, attention: str):
    """configs/wam.py's action_tune config for `size`, with the compute dtype and attention kernel set."""
    config = config_files.get_config(f"{os.path.join(REPO, 'configs', 'wam.py')}:size={size},stage=action_tune")
    config.model.dtype = dtype
    config.model.attention = attention
    return config


def random_params(config, dtype: str):
    """Random params of the config's shapes, created directly in `dtype` (a float32 init of 14B would not fit)."""
    cfg = model_config_from_run(config)
    tc, sc = 4, 8
    latent = (1 + (config.data.num_frames - 1) // tc, config.data.resolution[0] // sc,
              config.data.resolution[1] // sc, cfg.in_channels)
    abstract = jax.eval_shape(
        lambda: init_params(cfg, jax.random.key(0), latent, config.text.max_length, config.data.num_frames - 1)
    )
    leaves, treedef = jax.tree.flatten(abstract)

    @jax.jit
    def fill(key):
        keys = jax.random.split(key, len(leaves))
        return [0.02 * jax.random.normal(k, x.shape, jnp.dtype(dtype)) for k, x in zip(keys, leaves, strict=True)]

    return jax.tree.unflatten(treedef, fill(jax.random.key(0)))


def time_policy(policy: Policy, repeats: int) -> tuple[float, float, float]:
    """(first call s, median s, p90 s) of infer() on one random frame."""
    h, w = policy.resolution
    frame = np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)
    proprio = np.zeros(policy.proprio_dim, np.float32)
    start = time.perf_counter()
    policy.infer(frame, proprio, "pick up the block")
    first = time.perf_counter() - start
    times = []
    policy.timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        policy.infer(frame, proprio, "pick up the block")  # returns host numpy: includes the device sync
        times.append(time.perf_counter() - start)
        policy.timings.append(policy.last_timing)
    return first, float(np.median(times)), float(np.percentile(times, 90))


def stage_medians(timings: list[dict]) -> dict:
    """Per-stage medians (ms) of `policy_timing` dicts, and each denoising iteration's median."""
    out = {k: float(np.median([t[k] for t in timings])) for k in (*STAGES, "total_ms")}
    out["steps"] = [float(np.median(s)) for s in zip(*(t["denoise_steps_ms"] for t in timings), strict=True)]
    return out


def stage_row(label: str, medians: dict) -> str:
    steps = " ".join(f"{x:.1f}" for x in medians["steps"])
    return (f"| {label} | {medians['text_ms']:.2f} | {medians['encode_ms']:.1f} | {medians['prefill_ms']:.1f} | "
            f"{steps} | {medians['decode_ms']:.2f} | {medians['total_ms']:.1f} |")


STAGE_HEADER = ("| setting | text ms | image/VAE encode ms | KV prefill ms | denoising ms per iteration | decode ms "
                "| total ms |\n|---|---|---|---|---|---|---|")


def time_closed_loop(policy: Policy, repeats: int) -> tuple[float, float, float]:
    """(first chunk s, median s, p90 s) of one closed-loop chunk with the KV cache: next_actions() + observe()."""
    h, w = policy.resolution
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (h, w, 3), np.uint8)
    session = policy.start_rollout(frame, np.zeros(policy.proprio_dim, np.float32), "pick up the block")
    observation = rng.integers(0, 255, (session.frames_per_observation, h, w, 3), np.uint8)
    times = []
    policy.timings = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        session.next_actions()
        if i:
            policy.timings.append(session.last_timing)  # with the previous observation's encode and prefill
        session.observe(observation)
        times.append(time.perf_counter() - start)
    return times[0], float(np.median(times[1:])), float(np.percentile(times[1:], 90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny")
    parser.add_argument("--steps", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="dot_product")
    parser.add_argument("--cfg_scale", type=float, default=3.0, help="guidance scale of the CFG rows")
    parser.add_argument("--closed_loop", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a chunk-causal variant chunk by chunk with the KV cache")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"backend: {jax.default_backend()}  device: {device.device_kind}  jax {jax.__version__}")
    print("| size | clip | steps (video/action) | CFG | first call s | median ms / chunk | p90 ms / chunk |")
    print("|---|---|---|---|---|---|---|")
    stage_rows = []
    for size in args.sizes.split(","):
        config = run_config(size, args.dtype, args.attention)
        params = random_params(config, "float32" if args.dtype == "float32" else args.dtype)
        clip = f"{config.data.num_frames}x{config.data.resolution[0]}x{config.data.resolution[1]}"
        for steps in (int(s) for s in args.steps.split(",")):
            settings = [(steps, None, 1.0, True), (steps, None, args.cfg_scale, True)]
            if steps > 1:
                settings += [(steps, None, args.cfg_scale, False), (steps, 1, 1.0, True)]
            for num_steps, action_steps, cfg_scale, batched in settings:
                options = SamplerOptions(num_steps, action_steps, cfg_scale, batched, float(config.diffusion.shift))
                policy = Policy(config, params, {}, options=options)
                first, median, p90 = time_policy(policy, args.repeats)
                cfg_label = "off" if cfg_scale == 1.0 else f"{cfg_scale:g} {'batched' if batched else 'sequential'}"
                print(f"| {size} | {clip} | {num_steps}/{options.resolved_action_steps} | {cfg_label} | "
                      f"{first:.2f} | {1000 * median:.1f} | {1000 * p90:.1f} |", flush=True)
                stage_rows.append(stage_row(f"{size} {num_steps}/{options.resolved_action_steps} CFG {cfg_label}",
                                            stage_medians(policy.timings)))
        if not args.closed_loop:
            continue
        # Same sizes with chunk-causal attention: one chunk (1 latent frame + its actions) per call.
        config.model.attention_layout = "chunk_causal"
        for steps in (int(s) for s in args.steps.split(",")):
            options = SamplerOptions(steps, None, 1.0, True, float(config.diffusion.shift))
            policy = Policy(config, params, {}, options=options)
            first, median, p90 = time_closed_loop(policy, args.repeats)
            print(f"| {size} chunk-causal, KV cache, per chunk incl. observe | {clip} | {steps}/{steps} | off | "
                  f"{first:.2f} | {1000 * median:.1f} | {1000 * p90:.1f} |", flush=True)
            stage_rows.append(stage_row(f"{size} chunk-causal KV cache {steps}/{steps}", stage_medians(policy.timings)))
    print()
    print(STAGE_HEADER)
    print("\n".join(stage_rows), flush=True)


if __name__ == "__main__":
    main()
