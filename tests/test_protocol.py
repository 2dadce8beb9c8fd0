"""The round protocol: payloads on the wire, what a client starts from, events and budgets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from privlora import client, protocol
from privlora.errors import InvalidUpdate, PrivacyBudgetExceeded
from privlora.lora import Factors, flatten, is_factor_b
from privlora.privacy.plan import NoPrivacy, make_plan
from privlora.protocol import Payload
from privlora.rules import FFA, Exact, FedAvg
from privlora.simulation import prepare
from tests.builders import random_adapter

SHAPES = {"q": (6, 5), "v": (4, 5)}
COUNTS = {"num_examples": 24.0, "train_loss": 0.5}


def test_a_payload_round_trips_through_bytes_with_its_numbers():
    sent = Payload({"x.lora_A": torch.randn(3, 2), "x.lora_B": torch.arange(6.0).view(2, 3)},
                   {"num_examples": 24.0, "train_loss": 1.25})
    data = sent.to_bytes()
    got, size = protocol.transmit(sent)
    assert size == len(data)
    assert got.meta == {"num_examples": 24.0, "train_loss": 1.25}
    assert all(torch.equal(got.tensors[k], v) for k, v in sent.tensors.items())
    with pytest.raises(InvalidUpdate, match="not a valid safetensors"):
        Payload.from_bytes(data[: len(data) // 2])


def test_downlink_sends_what_the_rule_trains_and_a_rank_r_share():
    global_adapter = random_adapter(SHAPES, 0)
    full = protocol.downlink(FedAvg(), global_adapter, None).tensors
    assert set(full) == set(flatten(global_adapter))
    b_only = protocol.downlink(FFA(), global_adapter, None).tensors
    assert set(b_only) == {k for k in full if is_factor_b(k)}
    share = protocol.downlink(Exact(rank=4, scale=1.0), global_adapter, 2).tensors
    assert share["q.lora_A"].shape == (2, 5) and share["q.lora_B"].shape == (6, 2)
    assert torch.equal(share["q.lora_A"], global_adapter["q"].A[:2])


def test_client_start_is_rebuilt_from_the_payload_and_the_clients_own_init():
    global_adapter, init = random_adapter(SHAPES, 0), random_adapter(SHAPES, 1)
    start = protocol.client_start(protocol.downlink(FedAvg(), global_adapter, None), init, True)
    assert all(torch.equal(start[n].A, global_adapter[n].A) and
               torch.equal(start[n].B, global_adapter[n].B) for n in SHAPES)
    # FFA sends B only: A is the client's own seeded init (the same as the server's A)
    ffa_global = {n: Factors(A=init[n].A, B=f.B) for n, f in global_adapter.items()}
    start = protocol.client_start(protocol.downlink(FFA(), ffa_global, None), init, False)
    assert all(torch.equal(start[n].A, init[n].A) for n in SHAPES)
    assert all(start[n].A is not init[n].A for n in SHAPES)
    assert all(torch.equal(start[n].B, global_adapter[n].B) for n in SHAPES)
    # a rank-2 share is zero-padded to the full shapes
    share = protocol.downlink(Exact(rank=4, scale=1.0), global_adapter, 2)
    start = protocol.client_start(share, init, True)
    assert torch.equal(start["q"].A[:2], global_adapter["q"].A[:2])
    assert torch.count_nonzero(start["q"].A[2:]) == 0 and torch.count_nonzero(start["q"].B[:, 2:]) == 0


@pytest.mark.parametrize("damage, words", [
    (lambda t: {k: v for k, v in t.items() if k != "q.lora_A"}, "lacks"),
    (lambda t: {**t, "q.lora_A": torch.zeros(4, 7)}, "do not fit"),
    (lambda t: {**t, "q.lora_B": torch.full((6, 4), float("nan"))}, "NaN"),
])
def test_client_start_refuses_a_payload_that_is_not_an_adapter_for_its_model(damage, words):
    payload = protocol.downlink(FedAvg(), random_adapter(SHAPES, 0), None)
    with pytest.raises(InvalidUpdate, match=words):
        protocol.client_start(Payload(damage(dict(payload.tensors))), random_adapter(SHAPES, 1),
                              True)


def test_the_client_trains_on_what_the_payload_carries(tiny_config):
    sim = prepare(tiny_config("train.lr=0.01"))
    site, pad = sim.sites[0], sim.tokenizer.pad_token_id
    down = protocol.downlink(sim.server.rule, sim.init, None)
    name = next(k for k in down.tensors if is_factor_b(k))
    corrupted = Payload({**down.tensors, name: down.tensors[name] + 0.5})
    quantized = Payload({k: v.to(torch.bfloat16).float() for k, v in corrupted.tensors.items()})
    starts = [flatten(protocol.client_start(p, sim.init, True)) for p in (down, corrupted,
                                                                            quantized)]
    changed = [k for k in starts[0] if not torch.equal(starts[0][k], starts[1][k])]
    assert changed == [name]
    assert torch.equal(starts[1][name], down.tensors[name] + 0.5)
    assert all(torch.equal(starts[2][k], quantized.tensors[k]) for k in starts[2])
    # the update a client sends is trained from its start, so it follows the payload too
    ups = [client.run_round(sim.handles, sim.init, site, p, 0, 1, pad) for p in (down, corrupted)]
    assert any(not torch.equal(ups[0].tensors[k], ups[1].tensors[k]) for k in ups[0].tensors)
    again = client.run_round(sim.handles, sim.init, site, down, 0, 1, pad)
    assert all(torch.equal(again.tensors[k], ups[0].tensors[k]) for k in again.tensors)


def test_check_uplink_refuses_other_tensors_than_were_sent():
    sent = protocol.downlink(FFA(), random_adapter(SHAPES, 0), None)
    with_a = Payload(flatten(random_adapter(SHAPES, 0)), COUNTS)  # ffa must send B only
    with pytest.raises(InvalidUpdate, match=r"client 3 .*unexpected \['[^']*lora_A'"):
        protocol.check_uplink(3, sent, with_a, NoPrivacy())
    zeros = {k: torch.zeros_like(v) for k, v in sent.tensors.items()}
    protocol.check_uplink(3, sent, Payload(zeros, COUNTS), NoPrivacy())


def test_check_uplink_refuses_counts_under_dp_and_requires_them_without(tiny_config):
    sent = protocol.downlink(FedAvg(), random_adapter(SHAPES, 0), None)
    tensors = {k: torch.zeros_like(v) for k, v in sent.tensors.items()}
    local = make_plan(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1"), [24] * 4)
    protocol.check_uplink(1, sent, Payload(tensors), local)
    with pytest.raises(InvalidUpdate, match="under DP a client sends its update and nothing"):
        protocol.check_uplink(1, sent, Payload(tensors, COUNTS), local)
    with pytest.raises(InvalidUpdate, match="expected \\['num_examples', 'train_loss'\\]"):
        protocol.check_uplink(1, sent, Payload(tensors), NoPrivacy())
    with pytest.raises(InvalidUpdate, match="num_examples = 0"):
        protocol.check_uplink(1, sent, Payload(tensors, {**COUNTS, "num_examples": 0}),
                              NoPrivacy())


def test_ffa_refuses_a_client_whose_frozen_a_is_not_the_servers():
    global_adapter = random_adapter(SHAPES, 0)
    down = protocol.downlink(FFA(), global_adapter, None)
    assert down.meta == {protocol.FROZEN_A: protocol.frozen_a_digest(global_adapter)}
    protocol.client_start(down, global_adapter, train_a=False)
    with pytest.raises(InvalidUpdate, match="frozen A .* differs from the server's"):
        protocol.client_start(down, random_adapter(SHAPES, 1), train_a=False)


def test_client_selection_is_seeded_without_dp_and_secure_under_client_dp(tiny_config):
    fixed = tiny_config("federation.clients_per_round=2")
    plan = make_plan(fixed, [24] * 4)
    picks = [protocol.select_clients(plan, fixed.federation, 0, r) for r in (1, 1, 2)]
    assert picks[0] == picks[1] and len(picks[0]) == 2
    for reproducible, expect_equal in (("false", False), ("true", True)):
        config = tiny_config("federation.num_clients=4", "privacy.mode=client",
                             "privacy.noise_multiplier=1", f"privacy.reproducible_noise={reproducible}")
        many = dataclasses.replace(config, federation=dataclasses.replace(
            config.federation, num_clients=400, clients_per_round=200))
        plan = make_plan(many, [1] * 400)
        draws = [protocol.select_clients(plan, many.federation, 0, 1) for _ in range(2)]
        assert (draws[0] == draws[1]) == expect_equal
        assert 120 < len(draws[0]) < 280  # Poisson(q = 0.5) over 400 clients


@pytest.mark.parametrize("mode, extra", [
    ("sample", ["privacy.sample_rate=0.2"]), ("client", []), ("local", []),
])
def test_the_ledger_records_exactly_the_events_the_plan_forecast(tiny_config, mode, extra):
    config = tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=1.3", *extra)
    plan = make_plan(config, [24] * 4)
    ledger = plan.new_ledger()
    for _ in range(config.federation.rounds):
        protocol.spend(ledger, plan, range(4))  # every client in every round: the worst case
    for accountant, planned in (("pld", plan.epsilon_pld), ("rdp", plan.epsilon_rdp)):
        assert ledger.epsilon(accountant=accountant) == planned


def test_check_budget_refuses_a_round_before_spending_it(tiny_config):
    config = tiny_config("privacy.mode=local", "privacy.target_epsilon=4")
    plan = make_plan(config, [24] * 4)
    ledger = plan.new_ledger()
    for _ in range(config.federation.rounds):
        protocol.check_budget(ledger, plan, [0, 1])
        protocol.spend(ledger, plan, [0, 1])
    protocol.check_budget(ledger, plan, [2])  # client 2 has spent nothing yet
    with pytest.raises(PrivacyBudgetExceeded, match="client-0.*target_epsilon = 4"):
        protocol.check_budget(ledger, plan, [0])
    assert len(ledger.events("client-0")) == config.federation.rounds


def test_a_nonfinite_update_is_left_out_and_logged_locally(tiny_config, caplog):
    global_adapter = random_adapter(SHAPES, 0)
    good = Payload({k: torch.ones_like(v) for k, v in flatten(global_adapter).items()}, COUNTS)
    bad = Payload({k: torch.full_like(v, float("nan")) for k, v in good.tensors.items()}, COUNTS)
    with caplog.at_level("WARNING", logger="privlora.local"):
        out, _ = protocol.aggregate(FedAvg(), NoPrivacy(), global_adapter, [good, bad],
                                    torch.Generator())
    torch.testing.assert_close(out["q"].B, global_adapter["q"].B + 1.0)
    assert "1 non-finite update(s) left out" in caplog.text
    client = make_plan(tiny_config("privacy.mode=client", "privacy.noise_multiplier=1"), [24] * 4)
    with caplog.at_level("WARNING", logger="privlora.local"):
        protocol.aggregate(FedAvg(), client, global_adapter, [Payload(bad.tensors)],
                           torch.Generator())
    assert "1 non-finite client update(s) counted as zero" in caplog.text


def test_aggregate_weights_by_reported_counts_only_without_dp(tiny_config):
    global_adapter = random_adapter(SHAPES, 0)
    ups = [Payload({k: torch.full_like(v, value) for k, v in flatten(global_adapter).items()},
                   {"num_examples": count}) for value, count in ((1.0, 1.0), (5.0, 3.0))]
    plain = make_plan(tiny_config(), [24] * 4)
    out, _ = protocol.aggregate(FFA(), plain, global_adapter,
                                [Payload({k: v for k, v in u.tensors.items() if is_factor_b(k)},
                                         u.meta) for u in ups], torch.Generator())
    torch.testing.assert_close(out["q"].B, global_adapter["q"].B + 4.0)  # (1 x 1 + 3 x 5) / 4
    local = make_plan(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1"), [24] * 4)
    no_counts = [Payload({k: v for k, v in u.tensors.items() if is_factor_b(k)}) for u in ups]
    out, _ = protocol.aggregate(FFA(), local, global_adapter, no_counts, torch.Generator())
    torch.testing.assert_close(out["q"].B, global_adapter["q"].B + 3.0)  # equal weights


def test_client_mode_noises_even_a_round_nobody_joined(tiny_config):
    config = tiny_config("privacy.mode=client", "privacy.noise_multiplier=1",
                         "privacy.reproducible_noise=true")
    plan = make_plan(config, [24] * 4)
    global_adapter = random_adapter(SHAPES, 0)
    out, _ = protocol.aggregate(FedAvg(), plan, global_adapter, [], torch.Generator().manual_seed(1))
    moved = torch.cat([(flatten(out)[k] - v).flatten() for k, v in flatten(global_adapter).items()])
    # noise std on the mean: sigma * clip / (q N) = 1 * 1 / 4
    assert moved.std().item() == pytest.approx(0.25, rel=0.25)
