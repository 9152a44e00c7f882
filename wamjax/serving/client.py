"""A small client of the openpi websocket policy protocol.

Protocol (as openpi's `WebsocketPolicyServer` / `openpi_client.WebsocketClientPolicy`): on connect the server
sends one binary msgpack frame with its metadata; each request is a binary msgpack frame holding the
observation dict; each reply is a binary msgpack frame `{"actions": array, "server_timing": {...}}`, or a
text frame with an error message. Arrays travel in openpi's msgpack-numpy encoding (`wamjax.msgpack_numpy`).

Needs only numpy, msgpack and websockets (no JAX), so robots and notebooks can use it as is.
"""

from __future__ import annotations

import websockets.sync.client

from wamjax.msgpack_numpy import packb, unpackb


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
