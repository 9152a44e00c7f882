"""A checkpoint acting through the policy server: `python -m wamjax.serving.serve` on a free local port, one
openpi-protocol request per chunk, through `wamjax.serving.client` or openpi-client itself."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np

from wamjax.checkpoint import manager as ckpt
from wamjax.checkpoint.load import resolve_step_dir
from wamjax.eval.agents import stats_dataset
from wamjax.msgpack_numpy import packb, unpackb
from wamjax.serving.client import PolicyClient
from wamjax.sim import metaworld_env

# Runs in a Python that has openpi-client (its own venv: it pins numpy<2) and relays length-prefixed
# msgpack-numpy observations from stdin to the server and the replies back, so the loop talks to the server
# through the real client.
_OPENPI_BRIDGE = """
import struct, sys
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
client = WebsocketClientPolicy(host=sys.argv[1], port=int(sys.argv[2]))
source, sink = sys.stdin.buffer, sys.stdout.buffer
while header := source.read(4):
    observation = msgpack_numpy.unpackb(source.read(struct.unpack("<I", header)[0]))
    reply = msgpack_numpy.packb(client.infer(observation))
    sink.write(struct.pack("<I", len(reply)) + reply)
    sink.flush()
"""


class OpenpiBridge:
    """openpi-client's `WebsocketClientPolicy`, run by `python` (a venv with openpi-client), as `infer(obs)`."""

    def __init__(self, python: str, host: str, port: int):
        self.process = subprocess.Popen([python, "-c", _OPENPI_BRIDGE, host, str(port)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        message = packb(observation)
        self.process.stdin.write(struct.pack("<I", len(message)) + message)
        self.process.stdin.flush()
        header = self.process.stdout.read(4)
        if len(header) < 4:
            raise RuntimeError(f"the openpi-client bridge exited with {self.process.wait()}; see its stderr above")
        return unpackb(self.process.stdout.read(struct.unpack("<I", header)[0]))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


class ServerAgent:
    """The same loop through a running policy server: each chunk is one openpi-protocol request."""

    name = "wam (server)"

    def __init__(self, client: Any, frame_stride: int):
        self.client, self.frame_stride = client, frame_stride

    def reset(self, env: metaworld_env.MetaWorldTask, instruction: str, frame: np.ndarray) -> None:
        self.instruction = instruction

    def act(self, env: metaworld_env.MetaWorldTask, frame: np.ndarray) -> np.ndarray:
        reply = self.client.infer({"observation/image": frame, "observation/state": env.proprio(),
                                   "prompt": self.instruction})
        actions = np.asarray(reply["actions"], np.float32)
        return metaworld_env.env_action(np.repeat(actions, self.frame_stride, axis=0))

    def observe(self, frames: list[np.ndarray]) -> None:
        pass


@contextlib.contextmanager
def policy_server(checkpoint: str, *, dataset: str | None, num_steps: int, openpi_python: str | None,
                  timeout_s: float = 600.0) -> Iterator[ServerAgent]:
    """Starts `python -m wamjax.serving.serve` on a free local port and yields a `ServerAgent` talking to it."""
    frame_stride = int(ckpt.read_json_item(resolve_step_dir(checkpoint), "config")["data"]["frame_stride"])
    served = stats_dataset(checkpoint, dataset)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "wamjax.serving.serve", f"--checkpoint={checkpoint}", f"--port={port}",
               f"--num_steps={num_steps}", *([f"--dataset={served}"] if served else [])]
    server = subprocess.Popen(command)
    client: Any = None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the policy server exited with {server.returncode}: {' '.join(command)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the policy server on port {port} was not up after {timeout_s:.0f} s") from None
                time.sleep(1.0)
        client = OpenpiBridge(openpi_python, "127.0.0.1", port) if openpi_python else PolicyClient("127.0.0.1", port)
        agent = ServerAgent(client, frame_stride)
        if openpi_python:
            agent.name = "wam (server, openpi-client)"
        yield agent
    finally:
        if client is not None:
            client.close()
        server.terminate()
        server.wait(timeout=60)
