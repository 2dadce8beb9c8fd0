"""Protocol payloads as Flower records: named raw arrays (npy, never pickled) and a JSON text.

A ``Payload`` becomes an ``ArrayRecord`` (one Array per tensor, its name as the key) and its
meta a JSON string in a ``ConfigRecord``. The reverse conversion refuses anything that is not a
plain numeric array with the shape and dtype it declares.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from privlora.errors import InvalidUpdate
from privlora.protocol import Payload

DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}


def to_record(payload: Payload) -> tuple[ArrayRecord, str]:
    """Return the payload's tensors as an ArrayRecord and its meta as JSON text."""
    arrays = {name: Array.from_numpy_ndarray(t.detach().cpu().contiguous().numpy())
              for name, t in payload.tensors.items()}
    return ArrayRecord(arrays), json.dumps(dict(payload.meta), sort_keys=True)


def from_record(record: ArrayRecord, meta: str) -> Payload:
    """Rebuild a payload; an array that does not decode as numbers raises InvalidUpdate."""
    tensors = {}
    for name, array in record.items():
        try:
            value = array.numpy()
        except (ValueError, TypeError, OSError) as err:
            raise InvalidUpdate(f"array {name!r} does not decode as npy numbers ({err})") from None
        if (str(value.dtype) not in DTYPES or str(value.dtype) != array.dtype
                or tuple(value.shape) != tuple(array.shape)):
            raise InvalidUpdate(f"array {name!r}: {value.dtype} {value.shape} (declared "
                                f"{array.dtype} {tuple(array.shape)}) is not a numeric tensor "
                                f"of {sorted(DTYPES)}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
    try:
        values = json.loads(meta)
    except json.JSONDecodeError as err:
        raise InvalidUpdate(f"payload meta is not JSON ({err.msg})") from None
    if not isinstance(values, dict) or not all(
            isinstance(v, int | float | str) and not isinstance(v, bool) for v in values.values()):
        raise InvalidUpdate("payload meta must be a JSON object of numbers and strings")
    return Payload(tensors, values)
