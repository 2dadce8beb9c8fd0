"""The round protocol: what crosses the wire, what a client starts from, what the server does.

Pure functions over named tensors: no model, no dataset. The in-process simulation
(``simulation.run``, over ``rounds.run_rounds``) calls them; a Flower ServerApp / ClientApp calls the same ones. One round::

    ids = select_clients(plan, federation, seed, round_)            server
    check_budget(ledger, plan, ids)                                  server: refuse before spending
    spend(ledger, plan, ids)                                         server: record, then release
    down = downlink(rule, global_adapter, rank)                      server -> client (Payload)
    start = client_start(down, init, train_a)                        client: it trains on THIS
    up = Payload(delta, meta)  (client.run_round)                    client -> server (Payload)
    uplink.accept(client_id, down, up, ...)                          server: decode, size, and
                                                                     check_uplink: names,
                                                                     shapes, meta, norm
    global_adapter, diag = aggregate(rule, plan, global_adapter, uplinks, noise_rng)   server

A ``Payload`` is the only thing a client starts from, and its serialized bytes are what the
communication report counts: ``transmit`` turns it into bytes and back, so what is measured is
what is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from privlora import bounded_json
from privlora.config import FederationConfig
from privlora.errors import InvalidUpdate, PrivacyBudgetExceeded
from privlora.lora import Adapter, Factors, first_components, flatten, is_factor_b, wire_name
from privlora.privacy.accounting import compose
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.mechanisms import seeded_generator
from privlora.privacy.plan import PrivacyPlan
from privlora.rules import Rule, WithCentralDP

# Messages that stay with the party that logs them: never written to the run directory.
local_log = logging.getLogger("privlora.local")
COUNTS = ("num_examples", "train_loss")  # what a non-private uplink carries beside its tensors
FROZEN_A = "frozen_a_sha256"  # FFA downlinks: a digest of the A every party derives from the seed
RESERVED = "__metadata__"  # safetensors' header key: no tensor may take the name


@dataclass(frozen=True)
class Payload:
    """Named tensors exactly as sent, and a few values beside them (``meta``).

    An uplink's meta is the client's example count and training loss without DP, and empty in
    every private mode; an FFA downlink's meta is the digest of the frozen A.
    """

    tensors: Mapping[str, torch.Tensor]
    meta: Mapping[str, float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if RESERVED in self.tensors:
            raise ValueError(f"a payload tensor may not be named {RESERVED!r}, a reserved name: "
                             "safetensors keeps that key for its header; rename the tensor")

    def to_bytes(self) -> bytes:
        """Serialize as one safetensors buffer (names, shapes, dtypes, data; meta in the header)."""
        header = {k: json.dumps(v) for k, v in self.meta.items()}
        tensors = {k: v.detach().contiguous() for k, v in self.tensors.items()}
        return safetensors_save(tensors, metadata=header or None)

    @classmethod
    def from_bytes(cls, data: bytes) -> Payload:
        """Decode what ``to_bytes`` wrote; a damaged buffer raises InvalidUpdate."""
        try:
            tensors = safetensors_load(data)
            size = int.from_bytes(data[:8], "little")
            header = bounded_json.loads(data[8 : 8 + size]).get(RESERVED) or {}
            meta = {k: bounded_json.loads(v) for k, v in header.items()}
        except (SafetensorError, ValueError, UnicodeDecodeError) as err:
            raise InvalidUpdate(
                f"payload of {len(data)} bytes is not a valid safetensors buffer ({err}); "
                "the transfer was damaged: send it again"
            ) from None
        if not all(isinstance(v, int | float | str) and not isinstance(v, bool)
                   for v in meta.values()):
            raise InvalidUpdate(f"payload meta {sorted(meta)[:5]} must hold numbers and strings "
                                "only; client and server must run the same privlora version")
        return cls(tensors, meta)


def transmit(payload: Payload) -> tuple[Payload, int]:
    """Send ``payload`` over the in-process wire: return what arrives and its size in bytes."""
    data = payload.to_bytes()
    return Payload.from_bytes(data), len(data)


def select_clients(plan: PrivacyPlan, federation: FederationConfig, seed: int,
                   round_: int) -> list[int]:
    """Return this round's client ids, drawn as the privacy plan requires (Poisson in client
    mode, from the OS CSPRNG unless noise is reproducible; else a seeded fixed-size draw)."""
    rng = seeded_generator(seed, round_, "clients")
    return plan.select_clients(federation.num_clients, federation.per_round, rng)


def downlink(rule: Rule, global_adapter: Adapter, rank: int | None) -> Payload:
    """Return what the server sends a client: the global factors the rule trains (FFA: B only;
    A comes from the shared seed), the top ``rank`` components for a rank-r client."""
    flat = flatten(global_adapter)
    if rank is not None:  # SVD-ordered global: the first r components are its best rank-r share
        flat = first_components(flat, rank)
    if rule.trains_a:
        return Payload(flat)
    return Payload({k: v for k, v in flat.items() if is_factor_b(k)},
                   {FROZEN_A: frozen_a_digest(global_adapter)})


def frozen_a_digest(adapter: Adapter) -> str:
    """Return the SHA-256 of every A factor (float32, sorted layers): FFA's shared frozen A."""
    digest = hashlib.sha256()
    for layer in sorted(adapter):
        digest.update(layer.encode())
        digest.update(adapter[layer].A.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def client_start(payload: Payload, init: Adapter, train_a: bool) -> Adapter:
    """Rebuild the adapter a client trains from, using only the payload and its own ``init``.

    ``init`` is the adapter every party derives from the shared LoRA seed: it gives the shapes,
    and A where A is not sent (FFA-LoRA; the payload's digest must match this client's A).
    Factors sent with r < rank components (heterogeneous ranks) are zero-padded to full shape.
    Anything else in the payload is refused.
    """
    _check_downlink(payload, init, train_a)
    if not train_a and payload.meta.get(FROZEN_A) != frozen_a_digest(init):
        raise InvalidUpdate(
            "the frozen A this client derived from the shared LoRA seed differs from the "
            "server's; every party must use the same seed, lora settings and PEFT version"
        )
    start: Adapter = {}
    for layer, f in init.items():
        b = payload.tensors[wire_name(layer, "B")]
        rank = b.shape[1]
        B = torch.zeros_like(f.B, dtype=torch.float32)
        B[:, :rank] = b  # (out, r_k) into (out, r)
        if train_a:
            A = torch.zeros_like(f.A, dtype=torch.float32)
            A[:rank] = payload.tensors[wire_name(layer, "A")]  # (r_k, in) into (r, in)
        else:
            A = f.A.float().clone()
        start[layer] = Factors(A=A, B=B)
    return start


def _check_downlink(payload: Payload, init: Adapter, train_a: bool) -> None:
    """Refuse a downlink whose names, shapes or values are not a (rank-r share of an) adapter."""
    want = {wire_name(layer, "B") for layer in init}
    if train_a:
        want |= {wire_name(layer, "A") for layer in init}
    got = set(payload.tensors)
    if got != want:
        raise InvalidUpdate(
            f"downlink payload has unexpected tensors {sorted(got - want)[:3]} and lacks "
            f"{sorted(want - got)[:3]}; client and server must use the same lora settings and "
            "federation.aggregation"
        )
    for layer, f in init.items():
        b = payload.tensors[wire_name(layer, "B")]
        a = payload.tensors.get(wire_name(layer, "A"))
        rank = b.shape[1] if b.dim() == 2 else -1
        ok = b.dim() == 2 and b.shape[0] == f.B.shape[0] and 1 <= rank <= f.B.shape[1]
        if a is not None:
            ok = ok and a.dim() == 2 and tuple(a.shape) == (rank, f.A.shape[1])
        if not ok:
            raise InvalidUpdate(
                f"downlink layer {layer!r}: B {tuple(b.shape)}"
                + (f", A {tuple(a.shape)}" if a is not None else "")
                + f" do not fit this model's B {tuple(f.B.shape)}, A {tuple(f.A.shape)}"
            )
    if not is_finite(payload):
        raise InvalidUpdate("downlink payload holds NaN or inf; the server's adapter is broken")


def check_uplink(client_id: int, sent: Payload, received: Payload,
                 plan: PrivacyPlan) -> None:
    """Refuse an uplink whose tensors (names and shapes) are not those the client was sent, or
    whose numbers beside them are not what the plan allows (none under DP)."""
    _check_counts(client_id, received, plan)
    got = {k: tuple(v.shape) for k, v in received.tensors.items()}
    want = {k: tuple(v.shape) for k, v in sent.tensors.items()}
    if got == want:
        return
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    reshaped = [f"{k} {got[k]} != {want[k]}" for k in sorted(set(got) & set(want))
                if got[k] != want[k]]
    raise InvalidUpdate(
        f"client {client_id} sent tensors that differ from what it received: "
        f"unexpected {extra[:3]}, missing {missing[:3]}, wrong shape {reshaped[:3]}; a client "
        "must return an update for exactly the LoRA tensors of its downlink"
    )


def _check_counts(client_id: int, received: Payload, plan: PrivacyPlan) -> None:
    want = () if plan.private else COUNTS
    if sorted(received.meta) != sorted(want):
        raise InvalidUpdate(
            f"client {client_id} sent {sorted(received.meta)} beside its update, expected "
            f"{list(want)}; under DP a client sends its update and nothing else"
        )
    count = received.meta.get("num_examples", 1.0)
    if not (isinstance(count, int | float) and math.isfinite(count) and count >= 1):
        raise InvalidUpdate(f"client {client_id} reported num_examples = {count!r}; it must be a "
                            "count >= 1")


def is_finite(payload: Payload) -> bool:
    """Return whether every tensor of ``payload`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in payload.tensors.values())


def aggregate(rule: Rule, plan: PrivacyPlan, global_adapter: Adapter, uplinks: Sequence[Payload],
              noise_rng: torch.Generator) -> tuple[Adapter, dict[str, float]]:
    """Return the next global adapter and the rule's per-layer diagnostics.

    Without DP clients are weighted by the example counts they report; under DP every client
    weighs the same (counts are private and not sent). In client mode the plan's central
    mechanism clips each update and noises the sum, even when no client was sampled, and counts
    a non-finite update as zero; otherwise a non-finite update is left out. Either way the count
    goes to the server's local log only.
    """
    central = plan.central_mechanism()
    if central is None:
        finite = [u for u in uplinks if is_finite(u)]
        if len(finite) < len(uplinks):
            local_log.warning("server: %d non-finite update(s) left out",
                              len(uplinks) - len(finite))
        uplinks = finite
    if not uplinks and central is None:
        return global_adapter, {}
    deltas = [dict(u.tensors) for u in uplinks]
    weights = [1.0 if plan.private else float(u.meta["num_examples"]) for u in uplinks]
    aggregator = rule if central is None else WithCentralDP(rule, central, noise_rng)
    return aggregator.aggregate(global_adapter, deltas, weights)


def check_budget(ledger: PrivacyLedger | None, plan: PrivacyPlan,
                 participants: Sequence[int], repeat: frozenset[str] = frozenset()) -> None:
    """Refuse a round whose events would take any party past privacy.target_epsilon (parties
    in ``repeat`` release again exactly what they were charged for: see ``spend``)."""
    target = plan.target_epsilon
    if ledger is None or target is None:
        return
    for party, event in plan.round_events(participants).items():
        if party not in repeat and ledger.would_exceed(party, event, target, plan.accountant):
            raise PrivacyBudgetExceeded(
                f"round would take {party} past privacy.target_epsilon = {target}; "
                "stop here, or start a new run with a larger budget"
            )


def check_remaining(ledger: PrivacyLedger | None, plan: PrivacyPlan, rounds: int,
                    repeat: frozenset[str] = frozenset()) -> None:
    """Refuse to resume when ``rounds`` more rounds (each party in every one, the forecast's
    worst case) would take a party past privacy.target_epsilon; say how many still fit."""
    target = plan.target_epsilon
    if ledger is None or target is None or rounds <= 0:
        return

    def over(k: int) -> str | None:
        for party, event in plan.round_events(range(plan.num_clients)).items():
            n = k - 1 if party in repeat else k
            if n > 0 and ledger.would_exceed(party, compose([event] * n), target,
                                             plan.accountant):
                return party
        return None

    worst = over(rounds)
    if worst is None:
        return
    fit = max((k for k in range(rounds) if over(k) is None), default=0)
    raise PrivacyBudgetExceeded(
        f"resuming would take {worst} past privacy.target_epsilon = {target}: the round that "
        "was cut off was charged when it started (what left a site is spent) and its repeat "
        f"is a fresh release under OS-random noise. At most {fit} more round(s) fit: resume "
        f"with --set federation.rounds=N for N up to the rounds done + {fit}, or keep the "
        "last checkpoint's adapter"
    )


def spend(ledger: PrivacyLedger | None, plan: PrivacyPlan, participants: Sequence[int],
          repeat: frozenset[str] = frozenset()) -> None:
    """Record this round's events (the same ones ``check_budget`` and the plan forecast use).

    Call it before any client releases anything: a round that breaks off then counts in full,
    so the ledger can overstate what was spent but never understate it. ``repeat`` names the
    parties already charged for this very round before a crash, when the resumed round
    releases bit for bit what they released then (reproducible noise): releasing the same
    values again reveals nothing new, so they are not charged twice.
    """
    if ledger is None:
        return
    for party, event in plan.round_events(participants).items():
        if party not in repeat:
            ledger.record(party, event)
