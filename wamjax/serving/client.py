"""A small client of the openpi websocket policy protocol, and the protocol's msgpack-numpy encoding.

Protocol (as openpi's `WebsocketPolicyServer` / `openpi_client.WebsocketClientPolicy`): on connect the server
sends one binary msgpack frame with its metadata; each request is a binary msgpack frame holding the
observation dict; each reply is a binary msgpack frame `{"actions": array, "server_timing": {...}}`, or a
text frame with an error message. Arrays travel as maps {b"__ndarray__": True, b"data": raw bytes,
b"dtype": dtype.str, b"shape": shape}; numpy scalars as {b"__npgeneric__": True, b"data", b"dtype"}.

Needs only numpy, msgpack and websockets (no JAX), so robots and notebooks can use it as is.
"""

from __future__ import annotations

import functools
from typing import Any

import msgpack
import numpy as np
import websockets.sync.client


def pack_array(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays and scalars -> openpi's tagged maps."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise ValueError(f"Unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's tagged maps -> numpy arrays and scalars."""
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


packb = functools.partial(msgpack.packb, default=pack_array)
unpackb = functools.partial(msgpack.unpackb, object_hook=unpack_array)


class ServerError(RuntimeError):
    """The server answered a request with an error message (a text frame)."""


class PolicyClient:
    """Synchronous client: `PolicyClient(host, port).infer(observation) -> {"actions": ..., ...}`.

    A server that requires an API key refuses a missing or wrong one at connect time: the constructor raises
    `websockets.InvalidStatus` (HTTP 401).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None, open_timeout: float = 30.0
    ):
        self.uri = host if host.startswith("ws") else f"ws://{host}:{port}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None  # as openpi-client sends it
        connection = websockets.sync.client.connect(
            self.uri, compression=None, max_size=None, open_timeout=open_timeout, additional_headers=headers
        )
        # Entered by hand: the connection lives as long as this client, not one `with` block.
        self._ws = connection.__enter__()
        self.metadata = unpackb(self._ws.recv())

    def send_raw(self, data: bytes | str) -> dict | str:
        """Sends one frame as is; returns the decoded reply dict, or the error text the server sent."""
        self._ws.send(data)
        reply = self._ws.recv()
        return reply if isinstance(reply, str) else unpackb(reply)

    def infer(self, observation: dict) -> dict:
        """Sends an observation dict; returns the reply dict or raises ServerError with the server's message."""
        reply = self.send_raw(packb(observation))
        if isinstance(reply, str):
            raise ServerError(reply)
        return reply

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
