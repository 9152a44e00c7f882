"""openpi-compatible websocket policy server: `python -m wamjax.serving.serve --checkpoint=DIR --port=8000`.

Speaks the protocol of openpi's `WebsocketPolicyServer` (see `wamjax.serving.client`), so
`openpi_client.websocket_client_policy.WebsocketClientPolicy` works against it unchanged. Observation keys
map to the policy's camera / proprio / instruction inputs through an `ObservationSchema`, by default openpi's
LIBERO example: `observation/image` (H x W x 3 uint8), `observation/wrist_image` (read by two-camera policies,
optional otherwise), `observation/state` (float), `prompt` (str); a policy trained on more cameras reads further
keys (`--extra_image_keys`), one per camera of its `data.cameras` in order, all required. A malformed request
gets a text-frame error naming the problem (openpi's client raises it as RuntimeError); the connection and the
server stay up.

With an API key (`--api_key` or the `WAMJAX_API_KEY` environment variable) a connection must send openpi-client's
`Authorization: Api-Key <key>` header; without it or with another key the handshake is refused with HTTP 401.
`GET /healthz` stays open.

Every reply carries openpi's `server_timing` (`infer_ms`, `queue_ms`, and `prev_total_ms` from the second
request of a connection on) and, from a policy that records one (`last_timing`), `policy_timing`: its per-stage
breakdown (`text_ms`, `encode_ms`, `prefill_ms`, `denoise_ms` with `denoise_steps_ms` per iteration, `decode_ms`,
`total_ms`; see `wamjax.inference.timing`). A request may carry `action_prefix`, raw actions [k, action_dim]
already chosen for the chunk's start (real-time chunking: the ones that run while it is computed); they come
back unchanged at the front of the chunk, and a prefix longer than the chunk is refused naming the key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import http
import os
import threading
import time
import traceback
from typing import Any, Protocol

import numpy as np
import websockets.asyncio.server
import websockets.frames
import websockets.http11
from absl import logging

from wamjax.msgpack_numpy import packb
from wamjax.serving.observations import (
    DEFAULT_CAMERA_SHAPE,
    MalformedRequest,
    ObservationSchema,
    decode_action_prefix,
    decode_dataset,
    decode_observation,
    default_max_message_bytes,
)

API_KEY_ENV = "WAMJAX_API_KEY"


class ServedPolicy(Protocol):
    """What the server needs of a policy (wamjax.inference.Policy provides it)."""

    proprio_dim: int
    metadata: dict[str, Any]
    resolution: tuple[int, int]  # training resolution (H, W); requests may send any size
    num_frames: int  # frames of a training clip: more than a request's context frames

    def infer(self, frames: np.ndarray, proprio: np.ndarray | None, instruction: str,
              **action_prefix: np.ndarray) -> dict[str, np.ndarray]: ...


class _RequestRate:
    """Token bucket of one connection: `rate` requests/s sustained, bursts of up to max(1, rate) requests."""

    def __init__(self, rate: float):
        self.rate, self.capacity = rate, max(1.0, rate)
        self.tokens, self.last = self.capacity, time.monotonic()

    def wait_s(self) -> float:
        """0 and takes a token when a request may go now; else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclasses.dataclass
class _Job:
    """One decoded request waiting for the model."""

    frames: np.ndarray
    state: np.ndarray
    prompt: str
    enqueued: float
    done: asyncio.Future
    action_prefix: np.ndarray | None = None
    dataset: str | None = None


class PolicyServer:
    """Serves one policy over websockets.

    Requests of all connections share one bounded FIFO queue in front of the model; one worker feeds the
    model one request at a time on its own thread, so the event loop (handshakes, other clients' frames)
    never waits for inference. A request that finds `queue_size` requests already waiting is refused with
    a `server busy` error frame instead of waiting without bound.

    A frame larger than `max_message_bytes` (default: `default_max_message_bytes` of `image_shape`, itself
    the policy's training resolution but at least 224 x 224, and of the policy's clip length) is refused
    before it is read: the connection closes with code 1009 (message too big) and a reason naming both
    sizes. More than `max_requests_per_s` requests/s on one connection (0 = no limit) get a `rate limited`
    error frame. Refused requests never reach the model; the connection stays open for the next one.
    """

    def __init__(
        self,
        policy: ServedPolicy,
        *,
        schema: ObservationSchema | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        metadata: dict[str, Any] | None = None,
        api_key: str | None = None,
        queue_size: int = 8,
        max_message_bytes: int | None = None,
        image_shape: tuple[int, int] | None = None,
        max_requests_per_s: float = 100.0,
    ):
        if queue_size < 1:
            raise ValueError(f"queue_size={queue_size}; expected >= 1 (requests that may wait for the model)")
        if max_requests_per_s < 0:
            raise ValueError(f"max_requests_per_s={max_requests_per_s}; expected >= 0 (0 = no limit)")
        if image_shape is None:
            image_shape = tuple(max(a, b) for a, b in zip(policy.resolution, DEFAULT_CAMERA_SHAPE, strict=True))
        cameras = int(policy.metadata.get("cameras", 1))
        if max_message_bytes is None:
            max_message_bytes = default_max_message_bytes(image_shape, policy.num_frames, max(2, cameras))
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes={max_message_bytes}; expected >= 1")
        self.max_message_bytes = int(max_message_bytes)
        self.max_requests_per_s = float(max_requests_per_s)
        self.policy = policy
        # Compared as bytes: hmac.compare_digest takes str only when it is ASCII.
        self._expected_authorization = f"Api-Key {api_key}".encode() if api_key else None
        self.schema = schema or ObservationSchema()
        self.cameras = cameras
        self.camera_names = list(policy.metadata.get("camera_names", []))
        keys = self.schema.camera_keys
        if (cameras > 1 and len(keys) < cameras) or (self.schema.extra_images and len(keys) > cameras):
            raise ValueError(
                f"the policy reads {cameras} cameras {self.camera_names} (data.cameras of its checkpoint); the "
                f"observation schema names {len(keys)} camera keys {list(keys)}: one key per camera, in that order "
                "(image, wrist_image, then --extra_image_keys)")
        self.host, self.port = host, port
        self.queue_size = queue_size
        limits = {"max_message_bytes": self.max_message_bytes, "queue_size": queue_size,
                  "max_requests_per_s": self.max_requests_per_s}
        self.metadata = {**policy.metadata, "observation_keys": list(self.schema.keys), "server_limits": limits,
                         **(metadata or {})}
        self._queue: asyncio.Queue[_Job] | None = None
        self._server: websockets.asyncio.server.Server | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run_policy(self, job: _Job) -> tuple[dict[str, Any], float]:
        start = time.monotonic()
        try:
            prefix = {} if job.action_prefix is None else {"action_prefix": job.action_prefix}
            policy = self.policy if job.dataset is None else self.policy.for_dataset(job.dataset)
            result = policy.infer(job.frames, job.state, job.prompt, **prefix)
        except (ValueError, TypeError, KeyError) as e:  # input checks of the policy itself
            raise MalformedRequest(str(e)) from None
        infer_ms = 1000.0 * (time.monotonic() - start)
        # The policy's own per-stage breakdown (wamjax.inference.timing), carried as openpi's `policy_timing`.
        stages = getattr(policy, "last_timing", None)
        if stages and "policy_timing" not in result:
            result = {**result, "policy_timing": dict(stages)}
        return result, infer_ms

    async def _inference_worker(self, queue: asyncio.Queue[_Job]) -> None:
        """Feeds queued requests to the model one at a time, on one thread of its own."""
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-infer") as executor:
            while True:
                job = await queue.get()
                if job.done.cancelled():
                    continue
                queue_ms = 1000.0 * (time.monotonic() - job.enqueued)
                try:
                    result, infer_ms = await loop.run_in_executor(executor, self._run_policy, job)
                except Exception as e:
                    if not job.done.cancelled():
                        job.done.set_exception(e)
                else:
                    if not job.done.cancelled():
                        job.done.set_result((result, {"infer_ms": infer_ms, "queue_ms": queue_ms}))

    async def _infer(self, message: bytes | str) -> tuple[dict[str, Any], dict[str, float]] | str:
        """(result, timing) of one request, or the text of the error frame that refuses it."""
        try:
            frames, state, prompt = decode_observation(message, self.schema, self.policy.proprio_dim, self.cameras,
                                                       self.camera_names)
            action_prefix = decode_action_prefix(message, self.schema)
            dataset = decode_dataset(message, self.schema)
        except MalformedRequest as e:
            return f"malformed request: {e}"
        assert self._queue is not None
        job = _Job(frames, state, prompt, time.monotonic(), asyncio.get_running_loop().create_future(),
                   action_prefix, dataset)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            return (f"server busy: {self.queue_size} requests are already waiting for the model "
                    "(--queue_size); retry later")
        try:
            return await job.done
        except MalformedRequest as e:
            return f"malformed request: {e}"
        except Exception:  # a failing request must not take the server down
            logging.exception("inference failed")
            return f"inference failed:\n{traceback.format_exc()}"

    async def _handle(self, websocket: websockets.asyncio.server.ServerConnection) -> None:
        await websocket.send(packb(self.metadata))
        rate = _RequestRate(self.max_requests_per_s) if self.max_requests_per_s else None
        prev_total_ms = None
        while True:
            try:
                message = await websocket.recv()
            except websockets.ConnectionClosed as e:
                if e.sent is not None and e.sent.code == websockets.frames.CloseCode.MESSAGE_TOO_BIG:
                    logging.warning("closed connection from %s: message too big (%s; limit set by "
                                    "--max_message_bytes)", websocket.remote_address, e.sent.reason)
                return
            start = time.monotonic()
            wait_s = rate.wait_s() if rate is not None else 0.0
            if wait_s:
                answer = (f"rate limited: more than {self.max_requests_per_s:g} requests/s on this connection "
                          f"(--max_requests_per_s); retry in {1000.0 * wait_s:.0f} ms")
            else:
                answer = await self._infer(message)
            try:
                if isinstance(answer, str):
                    await websocket.send(answer)
                    continue
                result, timing = answer
                reply = {**result, "server_timing": dict(timing)}
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await websocket.send(packb(reply))
            except websockets.ConnectionClosed:
                return
            prev_total_ms = 1000.0 * (time.monotonic() - start)

    def _process_request(
        self, connection: websockets.asyncio.server.ServerConnection, request: websockets.http11.Request
    ) -> websockets.http11.Response | None:
        """Answers `/healthz`; refuses a handshake without the right API key (401); else lets it proceed."""
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._expected_authorization is None:
            return None
        sent = request.headers.get_all("Authorization")
        if len(sent) == 1 and hmac.compare_digest(sent[0].encode("utf-8", "surrogateescape"),
                                                  self._expected_authorization):
            return None
        logging.warning("refused connection from %s: %s API key", connection.remote_address,
                        "wrong" if sent else "no")
        response = connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                      "missing or wrong API key: send the header 'Authorization: Api-Key <key>'\n")
        response.headers["WWW-Authenticate"] = "Api-Key"
        return response

    async def serve(self) -> None:
        """Serves until `stop()`; with port 0 the bound port is stored in `self.port`."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        worker = asyncio.create_task(self._inference_worker(self._queue), name="policy-inference")
        async with websockets.asyncio.server.serve(
            self._handle, self.host, self.port, compression=None, max_size=self.max_message_bytes,
            # A connection buffers at most this many frames ahead of its handler: memory stays bounded.
            max_queue=2, process_request=self._process_request,
        ) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            logging.info("policy server on ws://%s:%d (%s)", self.host, self.port,
                         "API key required" if self._expected_authorization else "no API key")
            if self._expected_authorization is None and self.host not in ("127.0.0.1", "localhost", "::1"):
                logging.warning("serving on %s without an API key: anyone who reaches it can query the policy; "
                                "set WAMJAX_API_KEY (or --api_key)", self.host)
            self._ready.set()
            try:
                await server.wait_closed()
            finally:
                worker.cancel()

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


def parse_step_cache_mask(spec: str | None) -> tuple[bool, ...] | None:
    """`1,1,0,1` (1 = run the model, 0 = reuse the last velocity) -> a step cache mask; empty/None -> None."""
    if not spec:
        return None
    entries = [p.strip() for p in spec.split(",")]
    if any(e not in ("0", "1") for e in entries):
        raise ValueError(f"--step_cache_mask={spec!r}; expected comma-separated 0/1 entries, one per denoising "
                         "iteration")
    return tuple(e == "1" for e in entries)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    from wamjax.inference.policy import Policy  # JAX and the model: once the flags are parsed (a fast --help)

    f = flags.FLAGS
    if f.image_shape and len(f.image_shape) != 2:
        raise ValueError(f"--image_shape={','.join(f.image_shape)}; expected H,W")
    policy = Policy.from_checkpoint(
        f.checkpoint, num_steps=f.num_steps, action_steps=f.action_steps, cfg_scale=f.cfg_scale,
        cfg_batched=f.cfg_batched, use_ema=f.use_ema, dataset=f.dataset, seed=f.seed, mode=f.mode,
        video_stop_t=f.video_stop_t, step_cache_mask=parse_step_cache_mask(f.step_cache_mask),
        step_cache_threshold=f.step_cache_threshold, cfg_parallel=f.cfg_parallel,
        compilation_cache_dir=f.compilation_cache_dir,
    )
    server = PolicyServer(
        policy, schema=dataclasses.replace(ObservationSchema.parse(f.schema),
                                           extra_images=tuple(f.extra_image_keys or ())),
        host=f.host, port=f.port,
        api_key=f.api_key or os.environ.get(API_KEY_ENV) or None, queue_size=f.queue_size,
        max_message_bytes=f.max_message_bytes, max_requests_per_s=f.max_requests_per_s,
        image_shape=tuple(int(x) for x in f.image_shape) if f.image_shape else None,
    )
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
    flags.DEFINE_float("video_stop_t", 0.0, "Noise level the video's schedule stops at (DreamZero-Flash: > 0, with "
                                           "--action_steps=1).")
    flags.DEFINE_string("step_cache_mask", None, "DiT step caching, fixed: one 0/1 per denoising iteration (0 = "
                                                 "reuse the last velocity), e.g. 1,1,0,1.")
    flags.DEFINE_float("step_cache_threshold", None, "DiT step caching, dynamic: skip an iteration when the last "
                                                     "two velocities' cosine similarity exceeds it (1.0 never skips).")
    flags.DEFINE_integer("cfg_parallel", 1, "2: the conditional and null-text CFG branches on two devices.")
    flags.DEFINE_bool("use_ema", True, "Serve the EMA params when the checkpoint has them.")
    flags.DEFINE_string("dataset", None, "Which dataset's normalization stats to use (mixtures).")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling noise.")
    flags.DEFINE_string("compilation_cache_dir", "", "JAX's persistent compilation cache: a directory (gs:// too), "
                                                     "'off', or empty for JAX's own or the user's cache directory.")
    flags.DEFINE_enum("mode", "joint", ["joint", "imagine_then_act"],
                      "How the policy acts (reported in the metadata): joint video+action denoising, or "
                      "imagine_then_act (future video first, then actions by inverse dynamics on it).")
    flags.DEFINE_string("schema", "", "Observation keys, e.g. image=observation/image,state=observation/state,"
                                      "prompt=prompt,wrist_image=none (default: openpi's LIBERO example).")
    flags.DEFINE_list("extra_image_keys", [], "Observation keys of the cameras after image and wrist_image, in the "
                                             "order of the checkpoint's data.cameras (e.g. observation/image_2).")
    flags.DEFINE_string("api_key", None, f"Require 'Authorization: Api-Key <key>' (default: ${API_KEY_ENV}, "
                                         "which keeps the key out of the process list; unset = no key).")
    flags.DEFINE_integer("queue_size", 8, "Requests (of all clients) that may wait for the model while one runs; "
                                          "more are refused with a 'server busy' error frame.")
    flags.DEFINE_list("image_shape", None, "H,W of the largest camera image clients send; sizes the default "
                                           "--max_message_bytes (default: training resolution, at least 224,224).")
    flags.DEFINE_integer("max_message_bytes", None, "Largest request frame; larger ones close the connection with "
                                                    "1009 (default: the policy's cameras, at least two, of "
                                                    "--image_shape x clip length).")
    flags.DEFINE_float("max_requests_per_s", 100.0, "Requests per second per connection (bursts of as many); "
                                                    "more get a 'rate limited' error frame. 0 = no limit.")
    flags.mark_flag_as_required("checkpoint")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
