"""Properties of what crosses the wire: a Flower record (``wire``), a safetensors buffer
(``Payload.from_bytes``) and the server's check of an uplink (``uplink.accept``). Whatever the
bytes, they decode to a payload or raise one InvalidUpdate line; a truncated, mistyped,
reshaped, non-finite, oversize or padded update is refused; the round loop leaves a refused
client out and goes on while federation.min_clients remain; a reply to an earlier round's
message is never matched to this round's; a site refuses a message addressed to another."""

from __future__ import annotations

import io
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from privlora import rounds, uplink
from privlora.config import load_config
from privlora.errors import ConfigError, InvalidUpdate, RoundFailed
from privlora.flower import client_app, server_app, wire
from privlora.privacy.plan import NoPrivacy
from privlora.protocol import RESERVED, Payload
from privlora.quantization import codec
from tests.builders import sent_payload

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
SHAPES = {"q": (16, 8), "v": (12, 8)}
COUNTS = {"num_examples": 24.0, "train_loss": 0.5}
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


# --- payloads of any names, dtypes and shapes ----------------------------------------------------

@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(sorted(wire.DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    raw = draw(st.binary(min_size=math.prod(shape) * np.dtype(dtype).itemsize,
                         max_size=math.prod(shape) * np.dtype(dtype).itemsize))
    return torch.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())


names = text.filter(lambda name: name != RESERVED)  # Payload refuses safetensors' header key
payloads = st.builds(Payload, st.dictionaries(names, tensors(), max_size=4),
                     st.dictionaries(text, st.integers(-2**53, 2**53) | text
                                     | st.floats(allow_nan=False), max_size=3))


def same(a: Payload, b: Payload) -> bool:
    """Whether two payloads hold the same names, dtypes, shapes, bytes and meta (the order of
    names is safetensors' own)."""
    return (sorted(a.tensors) == sorted(b.tensors) and dict(a.meta) == dict(b.meta) and all(
        a.tensors[k].dtype == b.tensors[k].dtype and a.tensors[k].shape == b.tensors[k].shape
        and a.tensors[k].numpy().tobytes() == b.tensors[k].numpy().tobytes() for k in a.tensors))


@PROPERTY
@given(payload=payloads)
def test_a_payload_round_trips_bit_for_bit_on_either_wire(payload):
    got = wire.from_record(*wire.to_record(payload))
    assert same(got, payload) and list(got.tensors) == list(payload.tensors)
    assert same(Payload.from_bytes(payload.to_bytes()), payload)


def test_no_tensor_takes_the_safetensors_header_key_on_either_wire():
    with pytest.raises(ValueError, match="__metadata__"):
        Payload({RESERVED: torch.zeros(2)})
    record, text = wire.to_record(Payload({"x": torch.zeros(2)}))
    described = json.loads(text)
    described["index"][0]["name"] = RESERVED
    with pytest.raises(InvalidUpdate, match="reserved"):
        wire.from_record(record, json.dumps(described))


def decodes_or_refuses(call) -> Payload | None:
    """Return what ``call`` decodes, or None after it raised one InvalidUpdate line."""
    try:
        return call()
    except InvalidUpdate as err:
        assert str(err) and "\n" not in str(err)
        return None


def with_data(record: ArrayRecord, data: bytes) -> ArrayRecord:
    array = record[wire.BUFFER]
    return ArrayRecord({wire.BUFFER: Array(dtype=array.dtype, shape=array.shape,
                                           stype=array.stype, data=data)})


@PROPERTY
@given(payload=payloads, data=st.data())
def test_a_damaged_record_buffer_decodes_or_is_refused(payload, data):
    record, index = wire.to_record(payload)
    raw = record[wire.BUFFER].data
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(InvalidUpdate):  # truncated
        wire.from_record(with_data(record, raw[:cut]), index)
    with pytest.raises(InvalidUpdate):  # padded
        wire.from_record(with_data(record, raw + data.draw(st.binary(min_size=1))), index)
    flipped = bytearray(raw)
    for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
        flipped[at] = data.draw(st.integers(0, 255))
    decodes_or_refuses(lambda: wire.from_record(with_data(record, bytes(flipped)), index))


@PROPERTY
@given(payload=payloads, data=st.data())
def test_a_damaged_index_decodes_or_is_refused(payload, data):
    record, index = wire.to_record(payload)
    with pytest.raises(InvalidUpdate):
        wire.from_record(record, index[:data.draw(st.integers(0, len(index) - 1))])
    described = json.loads(index)
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                               lambda inner: st.lists(inner, max_size=2)
                               | st.dictionaries(text, inner, max_size=2), max_leaves=4)
    if described["index"]:
        entry = data.draw(st.sampled_from(described["index"]))
        entry[data.draw(st.sampled_from(["name", "dtype", "shape", "offset", "other"]))] = \
            data.draw(json_values)
    if data.draw(st.booleans()):
        described[data.draw(st.sampled_from(["index", "meta"]))] = data.draw(json_values)
    decodes_or_refuses(lambda: wire.from_record(record, json.dumps(described)))
    decodes_or_refuses(lambda: wire.from_record(record, data.draw(text)))


def test_a_header_claiming_a_huge_array_is_refused_without_allocating_it():
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.uint8))
    for dtype, shape in [("|u1", (2**40,)), ("<f4", (4,)), ("|u1", (2, 5))]:
        stream = io.BytesIO()
        np.lib.format.write_array_header_1_0(stream, {**header, "descr": dtype, "shape": shape})
        record = ArrayRecord({wire.BUFFER: Array(dtype="uint8", shape=(10,), stype="numpy.ndarray",
                                                 data=stream.getvalue() + bytes(10))})
        with pytest.raises(InvalidUpdate, match="npy header says") as err:
            wire.from_record(record, json.dumps({"index": [], "meta": {}}))
        one_line(err)


@pytest.mark.parametrize("record", [
    ConfigRecord({wire.BUFFER: 1}),
    ArrayRecord({wire.BUFFER: Array(dtype="uint8", shape=(1,), stype="torch.Tensor", data=b"x")}),
    ArrayRecord({wire.BUFFER: Array(dtype="uint8", shape=(1,), stype="numpy.ndarray",
                                    data=b"\x93NUMPY\x09\x00" + b"x" * 60)}),
])
def test_a_record_that_is_not_one_npy_byte_array_is_refused(record):
    with pytest.raises(InvalidUpdate, match="payload") as err:
        wire.from_record(record, json.dumps({"index": [], "meta": {}}))
    one_line(err)


@pytest.mark.parametrize("entry", [
    {"name": "a", "dtype": "float32", "shape": [1] * 40, "offset": 0},  # more dims than numpy
    {"name": "a", "dtype": "float32", "shape": [1], "offset": math.inf},
    {"name": "a", "dtype": "float32", "shape": [math.inf], "offset": 0},
    {"name": "a", "dtype": ["float32"], "shape": [1], "offset": 0},
    {"name": "a", "dtype": "float32", "shape": "1", "offset": 0},
    {"name": "a", "dtype": "float32", "shape": [True], "offset": 0},
    {"name": 7, "dtype": "float32", "shape": [1], "offset": 0},
])
def test_an_index_entry_of_the_wrong_types_is_refused(entry):
    record, _ = wire.to_record(Payload({"a": torch.zeros(1)}))
    with pytest.raises(InvalidUpdate) as err:
        wire.from_record(record, json.dumps({"index": [entry], "meta": {}}))
    one_line(err)


@pytest.mark.parametrize("index", ["1" * 5000, "[" * 100_000])  # too long a number, too deep
def test_an_index_json_python_cannot_read_is_refused(index):
    record, _ = wire.to_record(Payload({"a": torch.zeros(1)}))
    with pytest.raises(InvalidUpdate) as err:
        wire.from_record(record, index)
    one_line(err)


@PROPERTY
@given(payload=payloads, data=st.data())
def test_damaged_safetensors_bytes_decode_or_are_refused(payload, data):
    raw = payload.to_bytes()
    with pytest.raises(InvalidUpdate):
        Payload.from_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    flipped = bytearray(raw)
    for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
        flipped[at] = data.draw(st.integers(0, 255))
    decodes_or_refuses(lambda: Payload.from_bytes(bytes(flipped)))


@pytest.mark.parametrize("value", ["[1, 2]", "{\"a\": 1}", "true", "null", "[" * 100_000])
def test_safetensors_meta_that_is_not_a_number_or_string_is_refused(value):
    header = json.dumps({"__metadata__": {"num_examples": value}}).encode()
    with pytest.raises(InvalidUpdate) as err:
        Payload.from_bytes(len(header).to_bytes(8, "little") + header)
    one_line(err)


# --- the server's check of one uplink --------------------------------------------------------------

SENT = sent_payload(SHAPES)


def accept(received: Payload, bits: int = 0, size: int | None = None) -> Payload:
    """Send ``received`` through a Flower record, then check it as the server does."""
    arrived = wire.from_record(*wire.to_record(received))
    size = len(arrived.to_bytes()) if size is None else size
    return uplink.accept(3, SENT, arrived, size, NoPrivacy(), "none", bits)


@st.composite
def honest(draw, bits: int = 0) -> Payload:
    seed = draw(st.integers(0, 2**32))
    gen = torch.Generator().manual_seed(seed)
    update = {k: torch.randn(v.shape, generator=gen) * draw(st.floats(0, 1e3))
              for k, v in SENT.tensors.items()}
    count = float(draw(st.integers(1, 10**6)))
    meta = {"num_examples": count, "train_loss": draw(st.floats(0, 1e6))}
    return codec.pack_update(Payload(update, meta), bits, gen)


@PROPERTY
@given(update=st.integers(0, 2).flatmap(lambda i: st.tuples(st.just((0, 8, 4)[i]),
                                                            honest((0, 8, 4)[i]))))
def test_an_honest_update_is_accepted(update):
    bits, payload = update
    got = accept(payload, bits)
    assert set(got.tensors) == set(SENT.tensors)


CORRUPTIONS = ["dtype", "shape", "nonfinite", "extra", "missing", "meta-key", "meta-value",
               "count", "oversize"]


def corrupt(payload: Payload, kind: str, data) -> tuple[Payload, int | None]:
    """Return ``payload`` damaged as ``kind`` says, and the size to report (None: its own)."""
    tensors, meta = dict(payload.tensors), dict(payload.meta)
    name = data.draw(st.sampled_from(sorted(tensors)))
    match kind:
        case "dtype":
            dtype = data.draw(st.sampled_from([torch.float16, torch.float64, torch.int8,
                                               torch.int32, torch.uint8]))
            assume(dtype != tensors[name].dtype)
            tensors[name] = tensors[name].to(dtype)
        case "shape":
            shape = tuple(data.draw(st.lists(st.integers(0, 20), max_size=3)))
            assume(shape != tuple(tensors[name].shape))
            tensors[name] = torch.zeros(shape, dtype=tensors[name].dtype)
        case "nonfinite":
            assume(tensors[name].is_floating_point() and tensors[name].numel())
            tensors[name] = tensors[name].clone()
            at = data.draw(st.integers(0, tensors[name].numel() - 1))
            tensors[name].view(-1)[at] = data.draw(st.sampled_from([math.nan, math.inf,
                                                                    -math.inf]))
        case "extra":
            tensors[data.draw(text.filter(lambda t: t not in tensors))] = torch.zeros(2)
        case "missing":
            del tensors[name]
        case "meta-key":
            meta[data.draw(text.filter(lambda t: t not in meta))] = 1.0
        case "meta-value":
            key = data.draw(st.sampled_from(sorted(meta)))
            meta[key] = data.draw(st.sampled_from([math.nan, math.inf, -1.0, 0.5, 2.0**60])
                                  | text)
            assume(not (key == "train_loss" and isinstance(meta[key], float)
                        and math.isfinite(meta[key])))
        case "count":
            meta["num_examples"] = data.draw(st.floats(1, 1e6).filter(lambda x: x % 1)
                                             | st.floats(2.0**54, 1e300))
        case "oversize":
            limit = uplink.max_uplink_bytes(SENT, "none", 0)
            return payload, limit + data.draw(st.integers(1, 10**9))
    return Payload(tensors, meta), None


@PROPERTY
@given(payload=honest(), kind=st.sampled_from(CORRUPTIONS), data=st.data())
def test_a_damaged_update_is_refused_in_one_line_naming_the_client(payload, kind, data):
    bad, size = corrupt(payload, kind, data)
    with pytest.raises(InvalidUpdate, match="client 3") as err:
        accept(bad, size=size)
    one_line(err)


@PROPERTY
@given(bits=st.sampled_from([8, 4]), data=st.data())
def test_damaged_codes_or_scales_are_refused(bits, data):
    payload = data.draw(honest(bits))
    tensors = dict(payload.tensors)
    name = data.draw(st.sampled_from(sorted(tensors)))
    if name.endswith(codec.SCALE):
        tensors[name] = tensors[name].clone()
        tensors[name][0] = data.draw(st.sampled_from([math.nan, math.inf]))
    else:
        other = torch.int16 if tensors[name].dtype != torch.int16 else torch.int8
        tensors[name] = data.draw(st.sampled_from([tensors[name].to(other), tensors[name][:-1]]))
    with pytest.raises(InvalidUpdate) as err:
        accept(Payload(tensors, payload.meta), bits)
    one_line(err)


# --- the round: refused clients are left out, logged, and the round goes on -----------------------

@settings(max_examples=40, deadline=None)
@given(bad=st.lists(st.sampled_from(CORRUPTIONS[:-1] + ["silent"]) | st.none(), min_size=4,
                    max_size=4),
       min_clients=st.integers(1, 4), data=st.data())
def test_the_round_keeps_the_good_updates_and_stops_only_below_min_clients(bad, min_clients,
                                                                            data):
    config = load_config(None, ["federation.num_clients=4"])
    sim = SimpleNamespace(config=config, server=SimpleNamespace(plan=NoPrivacy()))
    ids = [0, 1, 2, 3]
    replies: dict = {}
    for cid, kind in zip(ids, bad):
        good = data.draw(honest())
        if kind == "silent":
            continue
        reply, size = (good, None) if kind is None else corrupt(good, kind, data)
        arrived = wire.from_record(*wire.to_record(reply))
        replies[cid] = (arrived, len(arrived.to_bytes()) if size is None else size)
    logger = logging.getLogger("privlora.local")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        uplinks, traffic, refused = rounds._accept(sim, 1, ids, {c: SENT for c in ids}, replies)
    finally:
        logger.removeHandler(handler)
    good = [c for c, k in zip(ids, bad) if k is None]
    assert sorted(uplinks) == good and sorted(refused) == [c for c in ids if c not in good]
    assert len(records) == len(refused)  # each one left out is logged, with why
    assert set(traffic) == set(ids)
    if len(good) >= min_clients:
        rounds._check_quorum(min_clients, 1, ids, uplinks)
    else:
        with pytest.raises(RoundFailed, match="min_clients"):
            rounds._check_quorum(min_clients, 1, ids, uplinks)


# --- deployment: which reply answers which message, and whose -----------------------------------

class FakeGrid:
    """A Grid whose pulls return the given replies, whatever ids are asked for."""

    def __init__(self, replies):
        self.replies = replies

    def push_messages(self, messages):
        return [f"round2-{k}" for k in range(len(messages))]

    def pull_messages(self, ids):
        replies, self.replies = self.replies, []
        return replies


def reply_to(message_id: str, node: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id,
                                                    src_node_id=node))


def to_node(node: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node))


def test_a_reply_to_an_earlier_rounds_message_is_not_taken_for_this_rounds():
    stale, fresh = reply_to("round1-0", 10), reply_to("round2-1", 11)
    got = server_app.exchange(FakeGrid([stale, fresh, reply_to("round2-1", 11)]),
                              [to_node(10), to_node(11)], 0.3)
    assert got == {1: fresh}  # message 0's slot stays empty: "no reply" after the timeout


def test_a_reply_from_another_node_than_the_message_went_to_is_ignored():
    forged, real = reply_to("round2-0", 11), reply_to("round2-0", 10)
    got = server_app.exchange(FakeGrid([forged]), [to_node(10), to_node(11)], 0.3)
    assert got == {}
    assert server_app.exchange(FakeGrid([forged, real]), [to_node(10)], 0.3) == {0: real}


def test_a_site_refuses_a_message_addressed_to_another_site():
    msg = SimpleNamespace(content={"run": {"client": 0}})
    with pytest.raises(ConfigError, match="a message for client 0 reached site 1"):
        client_app._train(msg, SimpleNamespace(node_config={"partition-id": 1}))


def read_reply(update, meta) -> object:
    reply = SimpleNamespace(has_error=lambda: False,
                            content={"update": update, "meta": {"meta": meta}})
    return server_app._read_reply(reply, uplink.max_uplink_bytes(SENT, "none", 0))


@PROPERTY
@given(payload=honest(), data=st.data())
def test_a_malformed_reply_is_a_reason_not_an_exception(payload, data):
    record, index = wire.to_record(payload)
    raw = record[wire.BUFFER].data
    assert isinstance(read_reply(record, index), tuple)
    cut = with_data(record, raw[:data.draw(st.integers(0, len(raw) - 1))])
    assert isinstance(read_reply(cut, index), str)
    assert isinstance(read_reply(record, index[:-1]), str)
    big = with_data(record, raw + bytes(2 * uplink.HEADER_SLACK))
    assert "over the" in read_reply(big, index)


def test_a_reply_whose_update_is_not_an_array_record_is_a_reason():
    assert isinstance(read_reply(ConfigRecord({wire.BUFFER: 1}), "{}"), str)
