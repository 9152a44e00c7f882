"""Policy server: openpi protocol, malformed requests, the CLI, and the real openpi-client package."""

import re
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import websockets
import websockets.frames
import websockets.sync.client
from test_inference import tiny_checkpoint
from train_utils import REPO, openpi_client_python, subprocess_env

from data_pipelines.sources.latents import pack_example, unpack_example
from wamjax.inference.policy import Policy
from wamjax.msgpack_numpy import packb, unpackb
from wamjax.serving.client import PolicyClient, ServerError
from wamjax.serving.observations import ObservationSchema, default_max_message_bytes
from wamjax.serving.serve import PolicyServer


def libero_observation(rng: np.random.Generator, wrist: bool = True) -> dict:
    """An observation in openpi's LIBERO example schema (224x224 cameras, 8-D state)."""
    obs = {
        "observation/image": rng.integers(0, 255, (224, 224, 3), np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "synthetic: lift the block",
    }
    if wrist:
        obs["observation/wrist_image"] = rng.integers(0, 255, (224, 224, 3), np.uint8)
    return obs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def policy(checkpoint):
    """One policy (compiled once) shared by every in-process server of this module."""
    return Policy.from_checkpoint(checkpoint, num_steps=1)


@pytest.fixture(scope="module")
def server(policy):
    server = PolicyServer(policy, port=0)
    server.start_in_thread()
    yield server
    server.stop()


def test_msgpack_numpy_round_trip_matches_openpi_encoding():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = msgpack.unpackb(packb({"a": array, "s": np.int64(3)}))
    assert raw["a"][b"__ndarray__"] is True and raw["a"][b"dtype"] == "<f4" and raw["a"][b"shape"] == [2, 3]
    assert raw["s"] == {b"__npgeneric__": True, b"data": 3, b"dtype": "<i8"}
    back = unpackb(packb({"a": array, "s": np.int64(3)}))
    np.testing.assert_array_equal(back["a"], array)
    assert back["s"] == np.int64(3) and back["s"].dtype == np.int64
    with pytest.raises(ValueError, match="Unsupported dtype: object"):
        packb(np.array([None]))


def _tagged(dtype: str, shape: list, data: bytes) -> bytes:
    return msgpack.packb({"a": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}})


@pytest.mark.parametrize("dtype,shape,data,expected", [
    ("|O", [2], bytes(16), "object, void and complex dtypes are refused"),
    ("<c8", [1], bytes(8), "object, void and complex dtypes are refused"),
    ("not-a-dtype", [1], bytes(4), "'not-a-dtype' is not a numpy dtype"),
    ("<f4", [4], bytes(8), "needs 16 bytes; got 8"),
    ("<f4", [1], bytes(8), "needs 4 bytes; got 8"),
    ("<f4", [-1], bytes(4), "non-negative ints"),
], ids=["object", "complex", "bad dtype", "short data", "long data", "negative shape"])
def test_msgpack_numpy_refuses_forged_arrays(dtype, shape, data, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        unpackb(_tagged(dtype, shape, data))


def test_latents_cache_records_use_the_same_codec():
    example = {"latents": np.ones((2, 3), np.float32), "instruction": np.str_("lift"), "index": np.int32(4)}
    record = pack_example(example)
    back = unpack_example(record)
    assert unpackb(record)["latents"].dtype == np.float32  # openpi's decoder reads it as is
    np.testing.assert_array_equal(back["latents"], example["latents"])
    assert back["latents"].flags.writeable and back["instruction"] == "lift" and isinstance(back["instruction"], str)
    assert back["index"].shape == () and back["index"] == 4 and back["index"].dtype == np.int32


def test_schema_parse():
    schema = ObservationSchema.parse("image=cam/front,wrist_image=none,prompt=task")
    assert (schema.image, schema.state, schema.prompt, schema.wrist_image) == (
        "cam/front", "observation/state", "task", None)
    with pytest.raises(ValueError, match="'camera=x'"):
        ObservationSchema.parse("camera=x")


def test_metadata_and_valid_requests(server):
    rng = np.random.default_rng(0)
    with PolicyClient("127.0.0.1", server.port) as client:
        assert client.metadata["action_horizon"] == 8 and client.metadata["action_dim"] == 7
        assert "observation/image" in client.metadata["observation_keys"]
        first = client.infer(libero_observation(rng))
        second = client.infer(libero_observation(rng, wrist=False))
    for reply in (first, second):
        assert reply["actions"].shape == (8, 7) and reply["actions"].dtype == np.float32
        assert np.all(np.isfinite(reply["actions"]))
        assert reply["server_timing"]["infer_ms"] > 0
    assert "prev_total_ms" in second["server_timing"] and "prev_total_ms" not in first["server_timing"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
        assert response.status == 200


def _obs(**changes) -> dict:
    obs = libero_observation(np.random.default_rng(1))
    for key, value in changes.items():
        key = key.replace("__", "/")
        if value is None:
            del obs[key]
        else:
            obs[key] = value
    return obs


MALFORMED = [
    ("not msgpack", b"\xc1\xc1 definitely not msgpack", "not valid msgpack"),
    ("text frame", "observation please", "text frame"),
    ("not a dict", packb([1, 2, 3]), "observation is list; expected a dict"),
    ("missing state", packb(_obs(observation__state=None)), "missing key(s) ['observation/state']"),
    ("missing image", packb(_obs(observation__image=None)), "missing key(s) ['observation/image']"),
    ("unknown key", packb(_obs(observation__depth=np.zeros(3))), "unexpected key(s) ['observation/depth']"),
    ("image dtype", packb(_obs(observation__image=np.zeros((224, 224, 3), np.float32))),
     "'observation/image' has dtype float32; expected uint8"),
    ("image shape", packb(_obs(observation__image=np.zeros((224, 224), np.uint8))),
     "'observation/image' has shape (224, 224)"),
    ("image not array", packb(_obs(observation__image=[1, 2, 3])), "'observation/image' is list"),
    ("wrist shape", packb(_obs(observation__wrist_image=np.zeros((4, 4, 4), np.uint8))),
     "'observation/wrist_image' has shape (4, 4, 4)"),
    ("state dtype", packb(_obs(observation__state=np.zeros(8, np.int64))),
     "'observation/state' has dtype int64; expected float32"),
    ("state shape", packb(_obs(observation__state=np.zeros((2, 8), np.float32))),
     "'observation/state' has shape (2, 8)"),
    ("state too long", packb(_obs(observation__state=np.zeros(9, np.float32))),
     "'observation/state' has shape (9,); expected (8,)"),
    ("state nan", packb(_obs(observation__state=np.full(8, np.nan, np.float32))), "non-finite"),
    ("prompt type", packb(_obs(prompt=7)), "'prompt' is int; expected str"),
    ("context frames", packb(_obs(observation__image=np.zeros((2, 32, 32, 3), np.uint8))), "2 context frames"),
]


def test_malformed_requests_get_named_errors_and_server_stays_up(server):
    with PolicyClient("127.0.0.1", server.port) as client:
        for name, message, expected in MALFORMED:
            reply = client.send_raw(message)
            assert isinstance(reply, str), f"{name}: expected an error reply, got {reply!r}"
            assert expected in reply, f"{name}: {reply!r} does not mention {expected!r}"
        # Same connection, then a fresh one: both still served.
        assert client.infer(_obs())["actions"].shape == (8, 7)
        with pytest.raises(ServerError, match="missing key"):
            client.infer({"prompt": "x"})
    with PolicyClient("127.0.0.1", server.port) as client:
        assert client.infer(_obs())["actions"].shape == (8, 7)


def test_api_key_is_required_at_the_handshake(policy, caplog):
    server = PolicyServer(policy, port=0, api_key="s3cret-key")
    server.start_in_thread()
    try:
        with PolicyClient("127.0.0.1", server.port, api_key="s3cret-key") as client:
            assert client.infer(_obs())["actions"].shape == (8, 7)
        for key in (None, "wrong-key", "s3cret-key2", "s3cret-ke"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                PolicyClient("127.0.0.1", server.port, api_key=key)
            assert refused.value.response.status_code == 401, key
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()
    refusals = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert len(refusals) == 4 and "no API key" in refusals[0] and "wrong API key" in refusals[1], refusals
    assert not any("s3cret" in r.getMessage() for r in caplog.records)  # the key never reaches the log


class GatedPolicy:
    """The real policy behind a gate: each call waits for one `gate.release()`; counts concurrent calls."""

    def __init__(self, policy: Policy):
        self.policy, self.proprio_dim, self.metadata = policy, policy.proprio_dim, policy.metadata
        self.resolution, self.num_frames = policy.resolution, policy.num_frames
        self.gate, self.entered = threading.Semaphore(0), threading.Semaphore(0)
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def infer(self, frames, proprio, instruction):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.release()
        try:
            assert self.gate.acquire(timeout=60), "gate never opened"
            return self.policy.infer(frames, proprio, instruction)
        finally:
            with self._lock:
                self.active -= 1


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_bounded_queue_runs_one_request_at_a_time_and_refuses_when_full(policy):
    gated = GatedPolicy(policy)
    server = PolicyServer(gated, port=0, queue_size=2)
    server.start_in_thread()
    clients = [PolicyClient("127.0.0.1", server.port) for _ in range(4)]
    replies: dict[int, object] = {}

    def ask(i: int) -> threading.Thread:
        thread = threading.Thread(target=lambda: replies.__setitem__(i, clients[i].send_raw(packb(_obs()))))
        thread.start()
        return thread

    try:
        threads = [ask(0)]
        assert gated.entered.acquire(timeout=30)  # client 0 holds the model
        threads += [ask(1), ask(2)]
        _wait_until(lambda: server._queue.qsize() == 2)
        refused = clients[3].send_raw(packb(_obs()))  # the queue is full: refused at once, not held
        assert isinstance(refused, str) and refused.startswith("server busy:") and "--queue_size" in refused
        gated.gate.release(3)
        for thread in threads:
            thread.join(timeout=60)
        assert all(isinstance(replies[i], dict) and replies[i]["actions"].shape == (8, 7) for i in range(3))
        assert gated.max_active == 1  # the model never ran two requests at once
        # The queued requests waited for the one ahead of them; the first did not.
        assert min(replies[i]["server_timing"]["queue_ms"] for i in (1, 2)) > replies[0]["server_timing"]["queue_ms"]
        gated.gate.release()
        assert clients[3].infer(_obs())["actions"].shape == (8, 7)  # served once there is room
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_a_client_stalled_mid_message_delays_no_other(server):
    def latency_s(client: PolicyClient) -> float:
        start = time.monotonic()
        client.infer(_obs())
        return time.monotonic() - start

    with PolicyClient("127.0.0.1", server.port) as probe:
        latency_s(probe)
        alone = statistics.median(latency_s(probe) for _ in range(7))
        with websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}", close_timeout=1) as staller:
            staller.recv()  # metadata
            frame = websockets.frames.Frame(websockets.frames.Opcode.BINARY, packb(_obs())).serialize(mask=True)
            staller.socket.sendall(frame[: len(frame) // 2])  # half a frame, then nothing
            beside = statistics.median(latency_s(probe) for _ in range(7))
            staller.close_socket()
    assert beside < 3 * alone + 0.2, f"median latency {beside * 1e3:.0f} ms beside a stalled client, " \
                                     f"{alone * 1e3:.0f} ms alone"


def test_message_size_is_bounded(policy, server, caplog):
    # The default fits two 224 x 224 cameras of a whole clip (the tiny model trains at 32 x 32, 9 frames).
    assert server.max_message_bytes == default_max_message_bytes((224, 224), 9) > len(packb(_obs()))
    assert server.metadata["server_limits"]["max_message_bytes"] == server.max_message_bytes
    small = PolicyServer(policy, port=0, max_message_bytes=100_000)
    small.start_in_thread()
    try:
        with PolicyClient("127.0.0.1", small.port) as client:
            with pytest.raises(websockets.ConnectionClosedError) as closed:
                client.infer(_obs())  # two 224 x 224 images: ~300 kB
            assert closed.value.rcvd.code == 1009 and "exceeds limit of 100000 bytes" in closed.value.rcvd.reason
        little = _obs(observation__image=np.zeros((32, 32, 3), np.uint8), observation__wrist_image=None)
        with PolicyClient("127.0.0.1", small.port) as client:
            assert client.infer(little)["actions"].shape == (8, 7)
    finally:
        small.stop()
    assert any("message too big" in r.getMessage() and "--max_message_bytes" in r.getMessage()
               for r in caplog.records)


def test_request_rate_is_limited_per_connection(policy):
    limited = PolicyServer(policy, port=0, max_requests_per_s=2.0)
    limited.start_in_thread()
    try:
        with PolicyClient("127.0.0.1", limited.port) as first, PolicyClient("127.0.0.1", limited.port) as second:
            replies = [first.send_raw(packb(_obs())) for _ in range(3)]  # a burst of 2 is allowed, not 3
            assert [isinstance(r, dict) for r in replies] == [True, True, False]
            assert replies[2].startswith("rate limited:") and "--max_requests_per_s" in replies[2]
            assert second.infer(_obs())["actions"].shape == (8, 7)  # the limit is per connection
            time.sleep(0.6)
            assert first.infer(_obs())["actions"].shape == (8, 7)  # and refills
    finally:
        limited.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPENPI_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from openpi_client import websocket_client_policy

    import websockets

    port, key = int(sys.argv[1]), sys.argv[2]
    for bad_key in (None, "not-" + key):
        try:
            websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port, api_key=bad_key)
            raise SystemExit(f"connection with api_key={bad_key!r} was accepted")
        except websockets.InvalidStatus as e:
            assert e.response.status_code == 401, e
    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port, api_key=key)
    meta = policy.get_server_metadata()
    horizon, dim = meta["action_horizon"], meta["action_dim"]
    rng = np.random.default_rng(0)
    timings = []
    for i in range(100):
        obs = {
            "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.standard_normal(8),  # float64, as the LIBERO example sends it
            "prompt": "synthetic: move the block right",
        }
        out = policy.infer(obs)
        assert out["actions"].shape == (horizon, dim), out["actions"].shape
        assert np.all(np.isfinite(out["actions"]))
        timings.append(out["server_timing"]["infer_ms"])
        stages = out["policy_timing"]  # the policy's per-stage breakdown rides in every reply
        total = sum(stages[k] for k in ("text_ms", "encode_ms", "prefill_ms", "denoise_ms", "decode_ms"))
        assert abs(total - stages["total_ms"]) <= 0.05 * stages["total_ms"], stages
        assert len(stages["denoise_steps_ms"]) == meta["num_steps"], stages
    try:
        policy.infer({"prompt": "no image"})
        raise SystemExit("malformed request was accepted")
    except RuntimeError as e:
        assert "missing key" in str(e), e
    print("OK", len(timings), np.__version__, horizon, dim)
""")


def test_real_openpi_client_100_requests_against_cli_server_with_api_key(checkpoint, tmp_path):
    python = openpi_client_python()
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "wamjax.serving.serve", f"--checkpoint={checkpoint}", f"--port={port}",
         "--num_steps=1"],
        cwd=REPO, env={**subprocess_env(devices=1), "WAMJAX_API_KEY": "robot-key-1"}, stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up:\n" + (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        script = tmp_path / "openpi_requests.py"
        script.write_text(OPENPI_SCRIPT)
        result = subprocess.run([python, str(script), str(port), "robot-key-1"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:] + (tmp_path / "server.log").read_text()[-2000:]
        words = result.stdout.split()
        assert words[:2] == ["OK", "100"] and words[2].startswith("1."), result.stdout  # numpy 1.x over there
        assert words[3:] == ["8", "7"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    server_log = (tmp_path / "server.log").read_text()
    assert "refused connection" in server_log and "no API key" in server_log and "wrong API key" in server_log
    assert "robot-key-1" not in server_log
