"""openpi-compatible websocket policy server: `python -m wamjax.serving.serve --checkpoint=DIR --port=8000`.

Speaks the protocol of openpi's `WebsocketPolicyServer` (see `wamjax.serving.client`), so
`openpi_client.websocket_client_policy.WebsocketClientPolicy` works against it unchanged. Observation keys
map to the policy's camera / proprio / instruction inputs through an `ObservationSchema`, by default openpi's
LIBERO example: `observation/image` (H x W x 3 uint8), `observation/wrist_image` (optional), `observation/state`
(float), `prompt` (str). A malformed request gets a text-frame error naming the problem (openpi's client
raises it as RuntimeError); the connection and the server stay up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import threading
import time
import traceback
from typing import Any, Protocol

import numpy as np
import websockets.asyncio.server
from absl import logging

from wamjax.serving.client import packb, unpackb


class ServedPolicy(Protocol):
    """What the server needs of a policy (wamjax.inference.Policy provides it)."""

    proprio_dim: int
    metadata: dict[str, Any]

    def infer(self, frames: np.ndarray, proprio: np.ndarray | None, instruction: str) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class ObservationSchema:
    """Which observation keys hold the camera image, the optional wrist image, the proprio state and the prompt.

    The wrist image is checked when sent but not used by a single-camera model.
    """

    image: str = "observation/image"
    state: str = "observation/state"
    prompt: str = "prompt"
    wrist_image: str | None = "observation/wrist_image"
    allow_extra_keys: bool = False

    @classmethod
    def parse(cls, spec: str) -> ObservationSchema:
        """`image=KEY,state=KEY,prompt=KEY,wrist_image=KEY|none` (omitted fields keep their defaults)."""
        values: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)} - {"allow_extra_keys"}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, key = part.partition("=")
            if not sep or name not in fields:
                raise ValueError(f"schema entry {part!r}; expected NAME=KEY with NAME in {sorted(fields)}")
            values[name] = None if (name == "wrist_image" and key.lower() == "none") else key
        return cls(**values)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.image, self.state, self.prompt, self.wrist_image) if k)


class MalformedRequest(ValueError):
    """A request the server cannot turn into policy inputs; the message names the key and what was expected."""


def _check_image(key: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise MalformedRequest(f"{key!r} is {type(value).__name__}; expected a numpy array H x W x 3 uint8")
    if value.dtype != np.uint8:
        raise MalformedRequest(f"{key!r} has dtype {value.dtype}; expected uint8")
    if value.ndim not in (3, 4) or value.shape[-1] != 3 or min(value.shape) == 0:
        raise MalformedRequest(f"{key!r} has shape {value.shape}; expected H x W x 3 (or T x H x W x 3)")
    return value


def decode_observation(
    message: bytes | str, schema: ObservationSchema, proprio_dim: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """One request frame -> (frames uint8, proprio float32 [P], prompt), or MalformedRequest naming the problem."""
    if isinstance(message, str):
        raise MalformedRequest("received a text frame; expected a binary msgpack frame with the observation dict")
    try:
        observation = unpackb(message)
    except Exception as e:  # msgpack raises several unrelated types for bad bytes
        raise MalformedRequest(f"message is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(observation, dict):
        raise MalformedRequest(f"observation is {type(observation).__name__}; expected a dict")
    keys = {k.decode() if isinstance(k, bytes) else k for k in observation}
    missing = [k for k in (schema.image, schema.state, schema.prompt) if k not in keys]
    if missing:
        raise MalformedRequest(f"observation is missing key(s) {missing}; received {sorted(map(str, keys))}")
    extra = sorted(map(str, keys - set(schema.keys)))
    if extra and not schema.allow_extra_keys:
        raise MalformedRequest(f"observation has unexpected key(s) {extra}; expected {list(schema.keys)}")

    frames = _check_image(schema.image, observation[schema.image])
    if schema.wrist_image and schema.wrist_image in observation:
        _check_image(schema.wrist_image, observation[schema.wrist_image])
    state = observation[schema.state]
    if not isinstance(state, np.ndarray):
        raise MalformedRequest(f"{schema.state!r} is {type(state).__name__}; expected a numpy float32 array")
    if state.dtype.kind != "f":
        raise MalformedRequest(f"{schema.state!r} has dtype {state.dtype}; expected float32")
    if state.ndim != 1 or not 0 < state.shape[0] <= proprio_dim:
        raise MalformedRequest(f"{schema.state!r} has shape {state.shape}; expected ({proprio_dim},) or shorter")
    if not np.all(np.isfinite(state)):
        raise MalformedRequest(f"{schema.state!r} has non-finite values")
    prompt = observation[schema.prompt]
    if not isinstance(prompt, str):
        raise MalformedRequest(f"{schema.prompt!r} is {type(prompt).__name__}; expected str")
    return frames, state.astype(np.float32), prompt


class PolicyServer:
    """Serves one policy over websockets; inference runs one request at a time, off the event loop."""

    def __init__(
        self,
        policy: ServedPolicy,
        *,
        schema: ObservationSchema | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        metadata: dict[str, Any] | None = None,
    ):
        self.policy = policy
        self.schema = schema or ObservationSchema()
        self.host, self.port = host, port
        self.metadata = {**policy.metadata, "observation_keys": list(self.schema.keys), **(metadata or {})}
        self._lock = asyncio.Lock()
        self._server: websockets.asyncio.server.Server | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _infer(self, message: bytes | str) -> dict[str, Any]:
        frames, state, prompt = decode_observation(message, self.schema, self.policy.proprio_dim)
        try:
            return self.policy.infer(frames, state, prompt)
        except (ValueError, TypeError, KeyError) as e:  # input checks of the policy itself
            raise MalformedRequest(str(e)) from None

    async def _handle(self, websocket: websockets.asyncio.server.ServerConnection) -> None:
        await websocket.send(packb(self.metadata))
        prev_total_ms = None
        while True:
            try:
                message = await websocket.recv()
            except websockets.ConnectionClosed:
                return
            start = time.monotonic()
            try:
                async with self._lock:
                    infer_start = time.monotonic()
                    result = await asyncio.to_thread(self._infer, message)
                    infer_ms = 1000.0 * (time.monotonic() - infer_start)
            except MalformedRequest as e:
                await websocket.send(f"malformed request: {e}")
                continue
            except Exception:  # a failing request must not take the server down
                logging.exception("inference failed")
                await websocket.send(f"inference failed:\n{traceback.format_exc()}")
                continue
            reply = dict(result)
            reply["server_timing"] = {"infer_ms": infer_ms}
            if prev_total_ms is not None:
                reply["server_timing"]["prev_total_ms"] = prev_total_ms
            await websocket.send(packb(reply))
            prev_total_ms = 1000.0 * (time.monotonic() - start)

    @staticmethod
    def _health_check(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    async def serve(self) -> None:
        """Serves until `stop()`; with port 0 the bound port is stored in `self.port`."""
        self._loop = asyncio.get_running_loop()
        async with websockets.asyncio.server.serve(
            self._handle, self.host, self.port, compression=None, max_size=None,
            process_request=self._health_check,
        ) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            logging.info("policy server on ws://%s:%d", self.host, self.port)
            self._ready.set()
            await server.wait_closed()

    def start_in_thread(self, timeout: float = 60.0) -> int:
        """Runs the server on a background thread (for tests and notebooks); returns the bound port."""
        thread = threading.Thread(target=lambda: asyncio.run(self.serve()), daemon=True, name="policy-server")
        thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"policy server on {self.host}:{self.port} did not start within {timeout}s")
        return self.port

    def stop(self) -> None:
        """Closes the server (from any thread)."""
        if self._server is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._server.close)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    from wamjax.inference.policy import Policy

    f = flags.FLAGS
    policy = Policy.from_checkpoint(
        f.checkpoint, num_steps=f.num_steps, action_steps=f.action_steps, cfg_scale=f.cfg_scale,
        cfg_batched=f.cfg_batched, use_ema=f.use_ema, dataset=f.dataset, seed=f.seed, mode=f.mode,
    )
    server = PolicyServer(policy, schema=ObservationSchema.parse(f.schema), host=f.host, port=f.port)
    asyncio.run(server.serve())


def define_flags() -> None:
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Checkpoint step directory, or a run's checkpoints/ (newest step).")
    flags.DEFINE_string("host", "127.0.0.1", "Interface to bind; 0.0.0.0 to accept remote robots.")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_integer("num_steps", 4, "Denoising steps of the video.")
    flags.DEFINE_integer("action_steps", None, "Denoising steps of the actions (default: num_steps).")
    flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale (1.0 = off).")
    flags.DEFINE_bool("cfg_batched", True, "Run the guided and null-text passes as one batched forward.")
    flags.DEFINE_bool("use_ema", True, "Serve the EMA params when the checkpoint has them.")
    flags.DEFINE_string("dataset", None, "Which dataset's normalization stats to use (mixtures).")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling noise.")
    flags.DEFINE_enum("mode", "joint", ["joint", "imagine_then_act"],
                      "How the policy acts (reported in the metadata): joint video+action denoising, or "
                      "imagine_then_act (future video first, then actions by inverse dynamics on it).")
    flags.DEFINE_string("schema", "", "Observation keys, e.g. image=observation/image,state=observation/state,"
                                      "prompt=prompt,wrist_image=none (default: openpi's LIBERO example).")
    flags.mark_flag_as_required("checkpoint")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
