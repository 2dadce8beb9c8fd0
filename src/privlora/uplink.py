"""What the server accepts from a client, in both runtimes: every uplink is checked before it
can reach the aggregate, and a bad one is refused with the reason (never aggregated).

Checks, in order: the size on the wire (against what an honest client of this config sends),
the codes of a compressed uplink, tensor names and shapes as sent, dtypes as sent, the numbers
beside the tensors (none under DP), every value finite, and in local mode the norm: an honest
release is the update clipped to C plus N(0, (sigma 2C)^2) noise per coordinate, so its norm
is below ``release_bound`` except with probability under 1e-13.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from privlora import protocol
from privlora.errors import InvalidUpdate
from privlora.privacy.plan import PrivacyPlan
from privlora.quantization import codec

TAIL = 8.0  # P(||N(0, I_d)|| > sqrt(d) + t) <= exp(-t^2 / 2): 1.3e-14 at t = 8
HEADER_SLACK = 4096  # bytes beyond the encoded tensors: the safetensors header and the counts


def max_uplink_bytes(sent: protocol.Payload, adapter_scheme: str, uplink_bits: int) -> int:
    """Return the largest uplink the server reads for this downlink: an honest client's encoded
    size (shapes only) plus the header's slack."""
    return codec.encoded_sizes(sent, adapter_scheme, uplink_bits)[0] + HEADER_SLACK


def release_bound(plan: PrivacyPlan, coordinates: int, uplink_bits: int) -> float | None:
    """Return the norm an honest local-mode release stays under (None where the client does not
    clip its release: the server clips in client mode, nothing bounds a DP-SGD or plain update).

    C + sigma 2C (sqrt(d) + 8), widened by what stochastic rounding can add: per block of 32 at
    most one step max|x| / levels per value, so at most sqrt(32) / levels times the norm.
    """
    mechanism = plan.release_mechanism()
    if mechanism is None:
        return None
    bound = mechanism.clip + mechanism.noise_multiplier * 2 * mechanism.clip * (
        math.sqrt(coordinates) + TAIL)
    if uplink_bits:
        bound *= 1 + math.sqrt(codec.BLOCK) / (2 ** (uplink_bits - 1) - 1)
    return bound


def accept(client_id: int, sent: protocol.Payload, received: protocol.Payload, size: int,
           plan: PrivacyPlan, adapter_scheme: str, uplink_bits: int) -> protocol.Payload:
    """Decode and check one uplink against the (decoded) downlink ``sent``; return the decoded
    update, or raise InvalidUpdate naming what was wrong."""
    limit = max_uplink_bytes(sent, adapter_scheme, uplink_bits)
    if size > limit:
        raise InvalidUpdate(f"client {client_id} sent {size} bytes, over the {limit} an update "
                            "of its downlink's tensors takes")
    update = codec.unpack_update(received, uplink_bits, sent)
    protocol.check_uplink(client_id, sent, update, plan)
    _check_numbers(client_id, update.meta)
    wrong = [f"{k} {v.dtype} != {sent.tensors[k].dtype}" for k, v in update.tensors.items()
             if v.dtype != sent.tensors[k].dtype]
    if wrong:
        raise InvalidUpdate(f"client {client_id} sent tensors of other dtypes than it received: "
                            f"{wrong[:3]}")
    if not protocol.is_finite(update):
        raise InvalidUpdate(f"client {client_id} sent NaN or inf")
    bound = release_bound(plan, sum(v.numel() for v in sent.tensors.values()), uplink_bits)
    if bound is not None:
        norm = math.sqrt(sum(float(torch.sum(v.double() ** 2)) for v in update.tensors.values()))
        if norm > bound:
            raise InvalidUpdate(f"client {client_id} sent an update of norm {norm:.4g}, over the "
                                f"{bound:.4g} a release clipped to privacy.clip and noised stays "
                                "under")
    return update


def _check_numbers(client_id: int, meta: Mapping[str, object]) -> None:
    """Refuse counts beside an update that are not finite numbers (the server averages the
    losses and weighs by the example counts), or an example count that is not a whole number
    a float holds exactly (a larger one would overflow the weights' sum)."""
    for key, value in meta.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidUpdate(f"client {client_id} sent {key} = {str(value)[:40]!r} beside its "
                                "update; it must be a finite number")
    count = meta.get("num_examples", 1)
    if not (float(count).is_integer() and count <= 2 ** 53):  # type: ignore[arg-type]
        raise InvalidUpdate(f"client {client_id} reported num_examples = {count!r}; it must be a "
                            "whole number of examples up to 2^53")
