"""The Flower wire records (``privlora.flower.wire``): a payload round-trips exactly, and what
does not describe numeric tensors exactly is refused."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from privlora.errors import InvalidUpdate
from privlora.flower import wire
from privlora.protocol import Payload


def test_wire_records_round_trip_names_dtypes_shapes_and_values():
    payload = Payload({"a.lora_B": torch.randn(5, 3), "a.lora_B:scale": torch.rand(2),
                       "codes": torch.randint(-127, 127, (2, 32), dtype=torch.int8),
                       "empty": torch.zeros(0, 4)},
                      {"num_examples": 24.0, "frozen_a_sha256": "ab" * 32})
    record, text = wire.to_record(payload)
    assert list(record) == ["payload"]  # one Flower object per payload, npy bytes, no pickle
    assert record["payload"].stype == "numpy.ndarray" and record["payload"].dtype == "uint8"
    got = wire.from_record(record, text)
    assert got.meta == payload.meta
    assert list(got.tensors) == list(payload.tensors)
    for name, value in payload.tensors.items():
        assert got.tensors[name].dtype == value.dtype
        assert torch.equal(got.tensors[name], value)


def _edited(text: str, **change) -> str:
    described = json.loads(text)
    described["index"][1].update(change)
    return json.dumps(described)


def test_wire_refuses_what_does_not_describe_numeric_tensors_exactly():
    record, text = wire.to_record(Payload({"a": torch.zeros(2, 3), "b": torch.ones(4)}))
    wire.from_record(record, text)  # the untouched pair decodes
    bad_records = {
        "other arrays": ArrayRecord({"evil": record["payload"]}),
        "a float array": ArrayRecord({"payload": Array.from_numpy_ndarray(np.zeros(10, np.float32))}),
        "pickled objects": ArrayRecord({"payload": Array(
            dtype="object", shape=(1,), stype="numpy.ndarray",
            data=pickle.dumps(np.array([{"x": 1}], dtype=object)))}),
    }
    for bad in bad_records.values():
        with pytest.raises(InvalidUpdate, match="payload"):
            wire.from_record(bad, text)
    bad_texts = [_edited(text, offset=4), _edited(text, shape=[400]), _edited(text, shape=[2]),
                 _edited(text, dtype="object"), _edited(text, shape=[-4]), "not json",
                 json.dumps({"index": [], "meta": {"a": {"b": 1}}}),
                 json.dumps({"index": [], "meta": {"a": True}})]
    for bad in bad_texts:
        with pytest.raises(InvalidUpdate):
            wire.from_record(record, bad)
