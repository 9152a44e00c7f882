"""openpi's msgpack-numpy encoding, the one codec of the policy server, its client and the latents cache.

Arrays travel as maps {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape};
numpy scalars as {b"__npgeneric__": True, b"data": value, b"dtype": dtype.str} (as
`openpi_client.msgpack_numpy`, so either side may be openpi's). Object, void and complex dtypes are refused
both ways: decoding reads bytes from the network, and an object array over them would be raw pointers.

Needs only numpy and msgpack.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = ("V", "O", "c")


def pack_array(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays and scalars -> openpi's tagged maps."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"Unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _dtype(obj: dict) -> np.dtype:
    name = obj.get(b"dtype")
    try:
        dtype = np.dtype(name)
    except TypeError as e:
        raise ValueError(f"array dtype {name!r} is not a numpy dtype ({e})") from None
    if dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"array dtype {dtype} is not accepted (object, void and complex dtypes are refused)")
    return dtype


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's tagged maps -> numpy arrays (read-only views) and scalars."""
    if b"__ndarray__" in obj:
        dtype, data, shape = _dtype(obj), obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes):
            raise ValueError(f"array data is {type(data).__name__}; expected bytes")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"array shape {shape!r}; expected a list of non-negative ints")
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(data):
            raise ValueError(f"array of shape {list(shape)} and dtype {dtype} needs "
                             f"{int(np.prod(shape, dtype=np.int64)) * dtype.itemsize} bytes; got {len(data)}")
        return np.ndarray(buffer=data, dtype=dtype, shape=shape)
    if b"__npgeneric__" in obj:
        return _dtype(obj).type(obj.get(b"data"))
    return obj


def packb(obj: Any) -> bytes:
    """Any msgpack-able structure, numpy arrays and scalars included -> bytes."""
    return msgpack.packb(obj, default=pack_array)


def unpackb(data: bytes) -> Any:
    """Inverse of `packb` (also reads what openpi-client's `packb` writes); arrays are read-only views."""
    return msgpack.unpackb(data, object_hook=unpack_array)
