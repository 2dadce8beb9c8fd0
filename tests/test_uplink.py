"""What the server accepts: every uplink checked before aggregation, in both runtimes; the
Flower wire format; a round that loses clients; the sites' own checks; certificates."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.app import Array, ArrayRecord

from privlora import data, protocol, server, uplink
from privlora.errors import ConfigError, DataError, InvalidUpdate, RoundFailed
from privlora.flower import certs, wire
from privlora.lora import Factors
from privlora.privacy.local import LocalDP
from privlora.privacy.plan import NoPrivacy, check_site, make_plan
from privlora.protocol import Payload
from privlora.quantization import codec
from privlora.rules import FedAvg

SHAPES = {"q": (64, 32), "v": (48, 32)}
COUNTS = {"num_examples": 24.0, "train_loss": 0.5}


def sent_payload(rank: int = 4) -> Payload:
    gen = torch.Generator().manual_seed(0)
    adapter = {n: Factors(A=torch.randn(rank, i, generator=gen), B=torch.randn(o, rank, generator=gen))
               for n, (o, i) in SHAPES.items()}
    return protocol.downlink(FedAvg(), adapter, None)


def accept(received: Payload, plan=None, bits: int = 0, size: int | None = None):
    sent = sent_payload()
    plan = plan or NoPrivacy()
    if size is None:
        size = len(received.to_bytes())
    return uplink.accept(3, sent, received, size, plan, "none", bits)


def zeros_like_sent(meta=COUNTS) -> Payload:
    return Payload({k: torch.zeros_like(v) for k, v in sent_payload().tensors.items()}, meta)


def corrupt(kind: str) -> Payload:
    good = zeros_like_sent()
    tensors = dict(good.tensors)
    name = min(tensors)
    match kind:
        case "shape":
            tensors[name] = tensors[name][:-1]
        case "nan" | "inf":
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[0] = math.nan if kind == "nan" else math.inf
        case "extra":
            tensors["base_model.extra.lora_B"] = tensors[name].clone()
        case "missing":
            del tensors[name]
        case "dtype":
            tensors[name] = tensors[name].double()
    return Payload(tensors, good.meta)


@pytest.mark.parametrize(("kind", "reason"), [
    ("shape", "wrong shape"), ("nan", "NaN or inf"), ("inf", "NaN or inf"),
    ("extra", "unexpected ['base_model.extra.lora_B']"), ("missing", "missing ["),
    ("dtype", "other dtypes"),
])
def test_each_malformed_update_is_refused_with_its_reason(kind, reason):
    accept(zeros_like_sent())  # the honest one passes
    with pytest.raises(InvalidUpdate, match="client 3") as err:
        accept(corrupt(kind))
    assert reason in str(err.value)


def test_an_update_larger_than_its_downlink_allows_is_refused_before_decoding():
    good = zeros_like_sent()
    limit = uplink.max_uplink_bytes(sent_payload(), "none", 0)
    assert len(good.to_bytes()) <= limit < len(good.to_bytes()) + 2 * uplink.HEADER_SLACK
    with pytest.raises(InvalidUpdate, match=f"over the {limit}"):
        accept(good, size=limit + 1)


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_local_mode_norm_bound_passes_honest_releases_and_refuses_over_clip(tiny_config, bits):
    """Honest releases (clip C, noise sigma 2C) stay under the bound, with no slack beyond the
    Gaussian tail and the rounding; an update of norm ten times the bound is refused."""
    config = tiny_config("privacy.mode=local", "privacy.noise_multiplier=0.3", "privacy.clip=1.0")
    plan = make_plan(config, [24] * 4)
    sent = sent_payload()
    d = sum(v.numel() for v in sent.tensors.values())
    bound = uplink.release_bound(plan, d, bits)
    mechanism = LocalDP(1.0, 0.3, secure=False)
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(50):
        update = {k: 100 * torch.randn(v.shape, generator=gen) for k, v in sent.tensors.items()}
        released, _ = mechanism.release(update, gen)
        packed = codec.pack_update(Payload(released), bits, gen)
        got = uplink.accept(3, sent, packed, len(packed.to_bytes()), plan, "none", bits)
        norms.append(math.sqrt(sum(float((v.double() ** 2).sum()) for v in got.tensors.values())))
    typical = 1.0 + 0.3 * 2 * math.sqrt(d)  # clip + the noise's expected norm
    assert max(norms) < bound
    # the only slack: 8 noise stds of tail (chi tail 1e-14), times the rounding's widening
    widening = 1 if bits == 0 else 1 + math.sqrt(32) / (2 ** (bits - 1) - 1)
    assert bound == pytest.approx((typical + 0.3 * 2 * 8) * widening)
    assert max(norms) > typical * 0.9
    big = {k: torch.full(v.shape, 10 * bound / math.sqrt(d)) for k, v in sent.tensors.items()}
    packed = codec.pack_update(Payload(big), bits, gen)
    with pytest.raises(InvalidUpdate, match="norm"):
        uplink.accept(3, sent, packed, len(packed.to_bytes()), plan, "none", bits)
    # the server clips in client mode, and nothing bounds a DP-SGD or plain update
    assert uplink.release_bound(NoPrivacy(), d, bits) is None
    client_plan = make_plan(tiny_config("privacy.mode=client", "privacy.noise_multiplier=1"),
                            [24] * 4)
    assert uplink.release_bound(client_plan, d, bits) is None


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


class LossyTransport:
    """The in-process wire, except that client 1 never answers and client 2 sends NaN."""

    def __init__(self, sim):
        self.inner = server.InProcess(sim)

    def reachable(self, ids):
        return ids

    def exchange(self, round_, downs, run):
        replies = self.inner.exchange(round_, downs, run)
        replies.pop(1, None)
        payload, size = replies[2]
        bad = dict(payload.tensors)
        name = min(bad)
        bad[name] = torch.full_like(bad[name], math.nan)
        replies[2] = (Payload(bad, payload.meta), size)
        return replies


def test_a_round_goes_on_without_the_clients_it_lost(tiny_config, tmp_path, read_metrics, caplog):
    config = tiny_config("federation.num_clients=4", "privacy.mode=local",
                         "privacy.noise_multiplier=0.5")
    sim = server.prepare(config)
    with caplog.at_level("WARNING", logger="privlora.local"):
        server.run_rounds(sim, LossyTransport(sim), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")[1:]
    assert all(r["clients"] == [0, 1, 2, 3] and r["rejected"] == [1, 2] for r in rows)
    assert all(r["bytes_by_client"]["1"]["up"] == 0 for r in rows)
    assert "client 1 left out: no reply" in caplog.text
    assert "client 2 sent NaN or inf" in caplog.text
    # what is published says nothing of why: the reasons stay in the server's log
    published = "".join(p.read_text() for p in (tmp_path / "run").glob("*.json*"))
    assert "NaN" not in published and "no reply" not in published


def test_too_few_acceptable_updates_stop_the_run_after_the_rounds_before(tiny_config, tmp_path,
                                                                          read_metrics):
    config = tiny_config("federation.num_clients=4", "federation.min_clients=3")
    sim = server.prepare(config)
    with pytest.raises(RoundFailed, match=r"round 1: 2 of 4 clients .*min_clients = 3"):
        server.run_rounds(sim, LossyTransport(sim), tmp_path / "run")
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [0]


def test_min_clients_is_checked_against_the_federation(tiny_config):
    with pytest.raises(ConfigError, match="federation.min_clients = 5"):
        tiny_config("federation.min_clients=5")


def test_a_site_checks_its_own_rows_against_the_servers_task(tmp_path, tiny_config):
    task = data.Task("t", "classification", "Classify.", ("neg", "pos"), ())
    assert data.task_from_meta(json.loads(json.dumps(data.task_meta(task)))) == task
    path = tmp_path / "site.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "odd", "label": "meh"}\n')
    with pytest.raises(DataError, match=r"labels \['meh'\] are not among"):
        data.site_rows(path, task, tiny_config().data)
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "bad"}\n')
    with pytest.raises(DataError, match="row 2 lacks"):
        data.site_rows(path, task, tiny_config().data)
    config = tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1",
                         "privacy.sample_rate=0.5", "train.batch_size=4")
    check_site(config, 32)  # expected batch 16 <= 4 x 4
    with pytest.raises(ConfigError, match="expected batch of 50"):
        check_site(config, 100)
    with pytest.raises(ConfigError, match="privacy.delta"):
        check_site(dataclasses.replace(config, privacy=dataclasses.replace(
            config.privacy, delta=0.5)), 32)


def test_certificates_chain_to_the_ca_and_name_the_address(tmp_path):
    made = certs.server_certs(tmp_path, "127.0.0.1")
    ca = x509.load_pem_x509_certificate(made.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(made.key.stat().st_mode & 0o777) == "0o600"
    private, public = certs.node_keys(tmp_path, "node0")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode() == \
        public.read_text()

