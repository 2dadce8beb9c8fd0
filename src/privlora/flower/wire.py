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

import io
import json
import math
import tokenize

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from privlora import bounded_json
from privlora.errors import InvalidUpdate
from privlora.protocol import Payload

DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}
BUFFER = "payload"  # the one Array of a record
MAX_DIMS = 8  # LoRA factors and codes are 2-D, scales 1-D (numpy itself refuses over 64)


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
        described = bounded_json.loads(text)
        index, meta = described["index"], described["meta"]
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidUpdate(f"payload index/meta is not the expected JSON "
                            f"({_short(f'{type(err).__name__}: {err}')})") from None
    if not isinstance(meta, dict) or not all(
            isinstance(v, int | float | str) and not isinstance(v, bool) for v in meta.values()):
        raise InvalidUpdate("payload meta must be a JSON object of numbers and strings")
    buffer = _buffer(record)
    tensors, offset = {}, 0
    for entry in index if isinstance(index, list) else [None]:
        name, dtype, shape, at = _entry(entry)
        if name in tensors or at != offset:
            raise InvalidUpdate(f"payload index: {_short(name)} repeats or is not where the "
                                "previous tensor ends")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if offset + size > buffer.size:
            raise InvalidUpdate(f"payload index: {_short(name)} runs past the end of the buffer")
        raw = buffer[offset:offset + size].copy()  # its own memory: no tensor shares another's
        tensors[name] = torch.from_numpy(raw.view(dtype).reshape(shape))
        offset += size
    if offset != buffer.size:
        raise InvalidUpdate(f"payload buffer has {buffer.size - offset} bytes no tensor covers")
    try:
        return Payload(tensors, meta)
    except ValueError as err:  # a name Payload refuses
        raise InvalidUpdate(f"payload index: {err}") from None


def _buffer(record: ArrayRecord) -> np.ndarray:
    """Return the record's byte array, reading its npy header here: ``Array.numpy`` would
    allocate whatever shape the header claims before finding the data short."""
    if not isinstance(record, ArrayRecord) or set(record) != {BUFFER}:
        held = sorted(record)[:3] if isinstance(record, ArrayRecord) else type(record).__name__
        raise InvalidUpdate(f"payload record holds {_short(held)}, not one {BUFFER!r} array")
    array = record[BUFFER]
    if not isinstance(array, Array) or array.stype != "numpy.ndarray":
        raise InvalidUpdate(f"payload {BUFFER!r} is not a numpy array")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, _, dtype = read_header(stream)
    except (ValueError, TypeError, KeyError, EOFError, SyntaxError, tokenize.TokenError) as err:
        raise InvalidUpdate(f"payload array does not decode as npy bytes "
                            f"({_short(f'{type(err).__name__}: {err}')})") from None
    body = array.data[stream.tell():]
    if dtype != np.uint8 or len(shape) != 1 or shape[0] != len(body):
        raise InvalidUpdate(f"payload array's npy header says {dtype} {shape} and {len(body)} "
                            "bytes follow; a payload is one flat uint8 array of its bytes")
    return np.frombuffer(body, dtype=np.uint8)


def _entry(entry: object) -> tuple[str, str, tuple[int, ...], int]:
    try:
        name, dtype = entry["name"], entry["dtype"]  # type: ignore[index]
        shape, offset = entry["shape"], entry["offset"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        raise InvalidUpdate(f"payload index entry {_short(entry)} lacks name, dtype, shape or "
                            "offset") from None
    if not (isinstance(name, str) and isinstance(shape, list) and _count(offset)
            and all(_count(n) for n in shape) and len(shape) <= MAX_DIMS):
        raise InvalidUpdate(f"payload index entry {_short(entry)}: name must be a string, shape "
                            f"a list of at most {MAX_DIMS} counts and offset a count")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidUpdate(f"payload index: {_short(name)} has dtype {_short(dtype)}, not one of "
                            f"{sorted(DTYPES)}")
    return name, dtype, tuple(shape), offset


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: object) -> str:
    """Return ``repr(value)`` cut to 120 characters: a message quotes a sender's text briefly."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
