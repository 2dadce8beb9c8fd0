"""What the server accepts: every uplink checked before aggregation (``uplink.accept``), in both
runtimes: a malformed or oversized update refused with its reason, and the local-mode norm bound."""

from __future__ import annotations

import math

import pytest
import torch

from privlora import uplink
from privlora.errors import InvalidUpdate
from privlora.privacy.client_dp import LocalDP
from privlora.privacy.plan import NoPrivacy, make_plan
from privlora.protocol import Payload
from privlora.quantization import codec
from tests.builders import random_like, sent_payload

SHAPES = {"q": (64, 32), "v": (48, 32)}
COUNTS = {"num_examples": 24.0, "train_loss": 0.5}


def accept(received: Payload, plan=None, bits: int = 0, size: int | None = None):
    sent = sent_payload(SHAPES)
    plan = plan or NoPrivacy()
    if size is None:
        size = len(received.to_bytes())
    return uplink.accept(3, sent, received, size, plan, "none", bits)


def zeros_like_sent(meta=COUNTS) -> Payload:
    return Payload({k: torch.zeros_like(v) for k, v in sent_payload(SHAPES).tensors.items()}, meta)


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
    limit = uplink.max_uplink_bytes(sent_payload(SHAPES), "none", 0)
    assert len(good.to_bytes()) <= limit < len(good.to_bytes()) + 2 * uplink.HEADER_SLACK
    with pytest.raises(InvalidUpdate, match=f"over the {limit}"):
        accept(good, size=limit + 1)


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_local_mode_norm_bound_passes_honest_releases_and_refuses_over_clip(tiny_config, bits):
    """Honest releases (clip C, noise sigma 2C) stay under the bound, with no slack beyond the
    Gaussian tail and the rounding; an update of norm ten times the bound is refused."""
    config = tiny_config("privacy.mode=local", "privacy.noise_multiplier=0.3", "privacy.clip=1.0")
    plan = make_plan(config, [24] * 4)
    sent = sent_payload(SHAPES)
    d = sum(v.numel() for v in sent.tensors.values())
    bound = uplink.release_bound(plan, d, bits)
    mechanism = LocalDP(1.0, 0.3, secure=False)
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(50):
        update = random_like(sent.tensors, gen, 100)
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
