"""Protocol payloads as Flower records: one raw byte array per payload, and a JSON index.

A ``Payload``'s tensors are laid end to end in one uint8 ``Array`` (npy bytes, never pickled);
the ``ConfigRecord`` beside it holds a JSON text: the index (each tensor's name, dtype, shape and
byte offset, in order) and the payload's meta. Why one array and not one per tensor: Flower
stores, pushes and pulls every Array as a separate object, and a reader that asks for an object
not yet there backs off 1, 2, 4, 8 s; with the built-in model's 120 LoRA tensors each reply
reached the server about 14 s after the site sent it. One array per payload moves the same
bytes as one object.

The reverse conversion refuses anything that is not a uint8 buffer exactly covered by an index
of known numeric dtypes and non-negative shapes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from privlora.errors import InvalidUpdate
from privlora.protocol import Payload

DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}
BUFFER = "payload"  # the one Array of a record


def to_record(payload: Payload) -> tuple[ArrayRecord, str]:
    """Return the payload as an ArrayRecord of one byte array, and its index and meta as JSON."""
    index, chunks, offset = [], [], 0
    for name, tensor in payload.tensors.items():
        value = tensor.detach().cpu().contiguous().numpy()
        index.append({"name": name, "dtype": str(value.dtype), "shape": list(value.shape),
                      "offset": offset})
        chunks.append(value.reshape(-1).view(np.uint8))
        offset += value.nbytes
    buffer = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
    text = json.dumps({"index": index, "meta": dict(payload.meta)}, sort_keys=True)
    return ArrayRecord({BUFFER: Array.from_numpy_ndarray(buffer)}), text


def from_record(record: ArrayRecord, text: str) -> Payload:
    """Rebuild a payload; a buffer or index that does not describe numeric tensors exactly
    raises InvalidUpdate."""
    try:
        described = json.loads(text)
        index, meta = described["index"], described["meta"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InvalidUpdate(f"payload index/meta is not the expected JSON ({err})") from None
    if not isinstance(meta, dict) or not all(
            isinstance(v, int | float | str) and not isinstance(v, bool) for v in meta.values()):
        raise InvalidUpdate("payload meta must be a JSON object of numbers and strings")
    buffer = _buffer(record)
    tensors, offset = {}, 0
    for entry in index if isinstance(index, list) else [None]:
        name, dtype, shape, at = _entry(entry)
        if name in tensors or at != offset:
            raise InvalidUpdate(f"payload index: {name!r} repeats or is not where the previous "
                                "tensor ends")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if offset + size > buffer.size:
            raise InvalidUpdate(f"payload index: {name!r} runs past the end of the buffer")
        raw = buffer[offset:offset + size].copy()  # its own memory: no tensor shares another's
        tensors[name] = torch.from_numpy(raw.view(dtype).reshape(shape))
        offset += size
    if offset != buffer.size:
        raise InvalidUpdate(f"payload buffer has {buffer.size - offset} bytes no tensor covers")
    return Payload(tensors, meta)


def _buffer(record: ArrayRecord) -> np.ndarray:
    if set(record) != {BUFFER}:
        raise InvalidUpdate(f"payload record holds {sorted(record)[:3]}, not one {BUFFER!r} array")
    try:
        buffer = record[BUFFER].numpy()
    except (ValueError, TypeError, OSError) as err:
        raise InvalidUpdate(f"payload array does not decode as npy bytes ({err})") from None
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise InvalidUpdate(f"payload array is {buffer.dtype} {buffer.shape}, not flat uint8")
    return buffer


def _entry(entry: object) -> tuple[str, str, tuple[int, ...], int]:
    try:
        name, dtype = str(entry["name"]), str(entry["dtype"])  # type: ignore[index]
        shape = tuple(int(n) for n in entry["shape"])  # type: ignore[index]
        offset = int(entry["offset"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise InvalidUpdate(f"payload index entry {entry!r} lacks name, dtype, shape or "
                            "offset") from None
    if dtype not in DTYPES or any(n < 0 for n in shape):
        raise InvalidUpdate(f"payload index: {name!r} has dtype {dtype} (not one of "
                            f"{sorted(DTYPES)}) or a negative dimension {shape}")
    return name, dtype, shape, offset
