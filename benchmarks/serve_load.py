"""Load on the policy server: N concurrent real clients x M requests on loopback, and one stalled client.

    python benchmarks/serve_load.py [--clients=1,2,4,8] [--requests=30] [--size=tiny] [--num_steps=1]

A `wamjax.serving.PolicyServer` (API key on, default queue, size and rate limits) serves a random-weight policy
of configs/wam.py's `size` on 127.0.0.1. Each client is its own process holding one `PolicyClient`
connection: one warm-up request, then all clients start together and send M LIBERO-style observations
(two 224 x 224 cameras, 8-D state, a prompt) back to back. Latency is client-side, send to reply. Errors
count every reply that is not an action chunk (none are expected while clients <= queue_size + 1).
The stall row times one client alone and then while another connection has sent half of a frame and
nothing more. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import socket
import statistics
import sys
import time

import numpy as np

HOST = "127.0.0.1"  # loopback only
API_KEY = "serve-load-benchmark"


def libero_observation(rng: np.random.Generator) -> dict:
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "pick up the block",
    }


def client_process(port: int, requests: int, seed: int, start, results) -> None:
    """One client: connect, warm up, wait for the others, send `requests` requests; report the timings."""
    from wamjax.serving.client import PolicyClient, ServerError

    rng = np.random.default_rng(seed)
    observations = [libero_observation(rng) for _ in range(min(requests, 4))]
    latencies, errors = [], []
    with PolicyClient(HOST, port, api_key=API_KEY) as client:
        for _ in range(200):  # warm-up: with more clients than the queue holds, some are refused at first
            try:
                client.infer(observations[0])
                break
            except ServerError:
                time.sleep(0.05)
        start.wait()
        began = time.monotonic()
        for i in range(requests):
            sent = time.monotonic()
            try:
                client.infer(observations[i % len(observations)])
                latencies.append(time.monotonic() - sent)
            except ServerError as e:
                errors.append(str(e).splitlines()[0])
        ended = time.monotonic()
    results.put((latencies, errors, began, ended))


def run_clients(port: int, clients: int, requests: int) -> dict:
    """N client processes x M requests at once: latency percentiles, throughput and errors."""
    ctx = multiprocessing.get_context("spawn")  # the parent runs JAX threads: no fork
    start, results = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=client_process, args=(port, requests, seed, start, results), daemon=True)
             for seed in range(clients)]
    for proc in procs:
        proc.start()
    outcomes, deadline = [], time.monotonic() + 600
    while len(outcomes) < clients:
        try:
            outcomes.append(results.get(timeout=1.0))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"client processes failed (exit codes {failed}) or ran past 600 s") from None
    for proc in procs:
        proc.join(timeout=60)
    latencies = [t for outcome in outcomes for t in outcome[0]]
    errors = [e for outcome in outcomes for e in outcome[1]]
    wall = max(o[3] for o in outcomes) - min(o[2] for o in outcomes)
    return {
        "p50_ms": 1000 * float(np.percentile(latencies, 50)) if latencies else float("nan"),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)) if latencies else float("nan"),
        "throughput": len(latencies) / wall,
        "errors": errors,
    }


def stalled_client_latency(port: int, requests: int) -> tuple[float, float]:
    """Median latency (ms) of one client alone, and while another connection is stalled mid-frame."""
    import websockets.frames
    import websockets.sync.client

    from wamjax.msgpack_numpy import packb
    from wamjax.serving.client import PolicyClient

    observation = libero_observation(np.random.default_rng(0))

    def median_ms(client: PolicyClient) -> float:
        times = []
        for _ in range(requests):
            sent = time.monotonic()
            client.infer(observation)
            times.append(time.monotonic() - sent)
        return 1000 * statistics.median(times)

    headers = {"Authorization": f"Api-Key {API_KEY}"}
    with PolicyClient(HOST, port, api_key=API_KEY) as probe:
        probe.infer(observation)
        alone = median_ms(probe)
        with websockets.sync.client.connect(f"ws://{HOST}:{port}", additional_headers=headers,
                                            close_timeout=1) as staller:
            staller.recv()
            frame = websockets.frames.Frame(websockets.frames.Opcode.BINARY, packb(observation)).serialize(mask=True)
            staller.socket.sendall(frame[: len(frame) // 2])
            beside = median_ms(probe)
            staller.socket.shutdown(socket.SHUT_RDWR)
            staller.close_socket()
    return alone, beside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts, one row each")
    parser.add_argument("--requests", type=int, default=30, help="requests per client")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--num_steps", type=int, default=1)
    args = parser.parse_args()

    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inference_latency import random_params, run_config

    from wamjax.diffusion.sampler import SamplerOptions
    from wamjax.inference.policy import Policy
    from wamjax.serving.serve import PolicyServer

    config = run_config(args.size, "float32", "dot_product")
    options = SamplerOptions(args.num_steps, None, 1.0, True, float(config.diffusion.shift))
    policy = Policy(config, random_params(config, "float32"), {}, options=options)
    server = PolicyServer(policy, host=HOST, port=0, api_key=API_KEY)
    port = server.start_in_thread()
    clip = f"{config.data.num_frames}x{config.data.resolution[0]}x{config.data.resolution[1]}"
    print(f"backend: {jax.default_backend()}  cpus: {os.cpu_count()}  size: {args.size} ({clip}), "
          f"{args.num_steps} step(s); queue_size {server.queue_size}, max_message_bytes {server.max_message_bytes}")
    print("| clients | requests | p50 ms | p99 ms | requests/s | errors |")
    print("|---|---|---|---|---|---|")
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            row = run_clients(port, clients, args.requests)
            errors = len(row["errors"])
            detail = f" ({sorted(set(row['errors']))[0]})" if errors else ""
            print(f"| {clients} | {clients * args.requests} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                  f"{row['throughput']:.1f} | {errors}{detail} |", flush=True)
        alone, beside = stalled_client_latency(port, args.requests)
        print(f"\nOne client, median of {args.requests}: {alone:.1f} ms alone, {beside:.1f} ms while another "
              "connection is stalled mid-frame.")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
