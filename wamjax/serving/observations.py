"""What a client sends the policy server: the observation schema (which keys are the cameras, state and prompt),
request decoding with errors that name the problem, and the message size a policy's observations need."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from wamjax.msgpack_numpy import unpackb

# Camera size a client may send at least (openpi's LIBERO example), whatever the model's training resolution.
DEFAULT_CAMERA_SHAPE = (224, 224)


@dataclasses.dataclass(frozen=True)
class ObservationSchema:
    """Which observation keys hold the camera image, the optional wrist image, the proprio state and the prompt.

    A single-camera model reads `image` (the wrist image is checked when sent, not used); a model trained on two
    cameras (`data.cameras`, e.g. primary,wrist) reads `image` and `wrist_image`, in that order, both required;
    one trained on more reads `extra_images` after those, one key per further camera.
    """

    image: str = "observation/image"
    state: str = "observation/state"
    prompt: str = "prompt"
    wrist_image: str | None = "observation/wrist_image"
    allow_extra_keys: bool = False
    extra_images: tuple[str, ...] = ()  # keys of the third, fourth, ... camera (data.cameras order)
    # Optional: raw actions [k, action_dim] already chosen for the chunk's start (real-time chunking), held clean.
    action_prefix: str | None = "action_prefix"
    # Optional: the dataset (of a run over several robots) whose embodiment and stats to act in; default --dataset.
    dataset: str | None = "dataset"

    @classmethod
    def parse(cls, spec: str) -> ObservationSchema:
        """`image=KEY,state=KEY,prompt=KEY,wrist_image=KEY|none` (omitted fields keep their defaults)."""
        values: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)} - {"allow_extra_keys", "extra_images", "action_prefix",
                                                             "dataset"}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, key = part.partition("=")
            if not sep or name not in fields:
                raise ValueError(f"schema entry {part!r}; expected NAME=KEY with NAME in {sorted(fields)}")
            values[name] = None if (name == "wrist_image" and key.lower() == "none") else key
        return cls(**values)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.image, self.state, self.prompt, self.wrist_image, *self.extra_images,
                                 self.action_prefix, self.dataset) if k)

    @property
    def camera_keys(self) -> tuple[str, ...]:
        """The image keys in camera order: image, wrist image (when named), then the extra images."""
        return tuple(k for k in (self.image, self.wrist_image, *self.extra_images) if k)


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
    message: bytes | str, schema: ObservationSchema, proprio_dim: int, cameras: int = 1,
    camera_names: list[str] | None = None,
) -> tuple[np.ndarray | list[np.ndarray], np.ndarray, str]:
    """One request frame -> (frames uint8, proprio float32 [P], prompt), or MalformedRequest naming the problem.

    With `cameras` > 1 the frames are a list of the schema's first `cameras` camera keys' images ([image, wrist
    image, extra images...]), every one required; `camera_names` (the policy's cameras) only word the error."""
    if isinstance(message, str):
        raise MalformedRequest("received a text frame; expected a binary msgpack frame with the observation dict")
    try:
        observation = unpackb(message)
    except Exception as e:  # msgpack raises several unrelated types for bad bytes
        raise MalformedRequest(f"message is not valid msgpack-numpy ({type(e).__name__}: {e})") from None
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
    camera_keys = schema.camera_keys[:cameras] if cameras > 1 else ()
    for key in camera_keys:
        if key not in observation:
            names = f" {camera_names}" if camera_names else ""
            raise MalformedRequest(f"observation is missing key {key!r}: this policy reads {cameras} cameras{names} "
                                   f"from keys {list(camera_keys)}")
    sent = [k for k in schema.camera_keys[1:] if k in observation]  # checked whether the policy reads them or not
    checked = {k: _check_image(k, observation[k]) for k in sent}
    if camera_keys:
        frames = [frames, *(checked[k] for k in camera_keys[1:])]
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


def decode_action_prefix(message: bytes, schema: ObservationSchema) -> np.ndarray | None:
    """The request's optional clean action prefix (float [k, action_dim]), or MalformedRequest naming the key;
    call after `decode_observation` accepted the message."""
    if schema.action_prefix is None:
        return None
    observation = unpackb(message)
    prefix = next((v for k, v in observation.items()
                   if (k.decode() if isinstance(k, bytes) else k) == schema.action_prefix), None)
    if prefix is None:
        return None
    if not isinstance(prefix, np.ndarray) or prefix.dtype.kind != "f" or prefix.ndim != 2:
        raise MalformedRequest(f"{schema.action_prefix!r} is {type(prefix).__name__} "
                               f"{getattr(prefix, 'shape', '')}; expected a float array [k, action_dim]")
    return prefix.astype(np.float32)


def decode_dataset(message: bytes, schema: ObservationSchema) -> str | None:
    """The request's optional dataset name (str), or MalformedRequest naming the key; call after
    `decode_observation` accepted the message."""
    if schema.dataset is None:
        return None
    observation = unpackb(message)
    name = next((v for k, v in observation.items() if (k.decode() if isinstance(k, bytes) else k) == schema.dataset),
                None)
    if name is not None and not isinstance(name, str):
        raise MalformedRequest(f"{schema.dataset!r} is {type(name).__name__}; expected the dataset's name (str)")
    return name


def default_max_message_bytes(image_shape: tuple[int, int], context_frames: int, cameras: int = 2) -> int:
    """Largest request frame accepted by default: `cameras` uint8 images of `context_frames` x H x W x 3,
    plus a quarter and 1 MiB for the state, the prompt and msgpack's framing."""
    h, w = image_shape
    image_bytes = cameras * context_frames * h * w * 3
    return image_bytes + image_bytes // 4 + (1 << 20)
