"""Published records: a round's row and the communication totals, shaped by the privacy plan."""

from __future__ import annotations

import pytest

from privlora import records
from privlora.evaluate import EvalResult
from privlora.privacy.plan import NoPrivacy, make_plan

RESULT = EvalResult(accuracy=0.5, loss=1.0, perplexity=2.718, examples=16)
TRAFFIC = {0: records.Traffic(up=110, down=100), 2: records.Traffic(up=130, down=100)}


def row(plan, diagnostics=None):
    return records.RoundRecord(
        round=1, result=RESULT, traffic=TRAFFIC, rejected=[], train_losses=[0.5, 1.5],
        seconds=2.0, epsilon=None, rule="fedavg", diagnostic="factor_gap",
        diagnostics=diagnostics or {}, full_model_bytes=1000).published(plan)


def test_a_round_row_totals_bytes_and_names_the_rules_diagnostic():
    shown = row(NoPrivacy(), {"q": 0.1, "v": 0.3})
    assert (shown["bytes_up"], shown["bytes_down"], shown["clients"]) == (240, 200, [0, 2])
    assert shown["bytes_up_per_client"] == 120 and shown["ratio_up_vs_full"] == 0.12
    assert shown["train_loss"] == 1.0
    assert shown["factor_gap_max"] == 0.3 and shown["factor_gap_mean"] == pytest.approx(0.2)
    assert "factor_gap_max" not in row(NoPrivacy())  # no diagnostics that round


def test_communication_totals_are_measured_or_expected_by_the_plan(tiny_config):
    rows = [{"round": 0}, {"round": 1, "clients": [0, 2], "bytes_up": 240, "bytes_down": 200}]
    comm = records.communication(rows, NoPrivacy(), 1, 4, 4, 999.0, 999.0, 1000)
    assert (comm["bytes_up_total"], comm["client_participations"]) == (240, 2)
    client = make_plan(tiny_config("privacy.mode=client", "privacy.noise_multiplier=1",
                                   "federation.clients_per_round=2"), [24] * 4)
    hidden = [{"round": 0}, client.redact(rows[1])]
    comm = records.communication(hidden, client, 3, 4, 2, 40.0, 100.0, 1000, bundle_bytes=7)
    assert comm["participations_are_expected_values"]
    assert comm["client_participations"] == 0.5 * 4 * 3  # q * N * rounds
    assert (comm["bytes_up_total"], comm["bytes_down_total"]) == (40.0 * 6, 100.0 * 6)
    assert (comm["bundle_bytes_per_client"], comm["bundle_bytes_down_total"]) == (7, 7 * 4)


def test_a_summary_says_it_stopped_on_noise_only_when_it_could_have():
    common = {"task": "t", "labels": ("a", "b"), "model": "m", "majority": 0.5,
              "zero_shot": RESULT, "final": RESULT, "rule": "fedavg", "privacy": None,
              "communication": {}, "wall_seconds": 12.34}
    plain = records.Summary(rounds=5, **common).published()
    assert "stopped_on_noise" not in plain and "model_privacy" not in plain
    assert (plain["rounds"], plain["wall_seconds"], plain["labels"]) == (5, 12.3, ["a", "b"])
    assert plain["final"]["accuracy"] == 0.5 and plain["versions"]["torch"] != "not installed"
    stopped = records.Summary(rounds=3, rounds_planned=5, model_privacy={"x": 1},
                              **common).published()
    assert (stopped["stopped_on_noise"], stopped["rounds_planned"]) == (True, 5)
    assert stopped["model_privacy"] == {"x": 1}
    ran_out = records.Summary(rounds=5, rounds_planned=5, **common).published()
    assert ran_out["stopped_on_noise"] is False


def test_model_privacy_and_the_update_agreement_are_published_beside_the_redacted_fields(
        tiny_config):
    client = make_plan(tiny_config("privacy.mode=client", "privacy.noise_multiplier=1",
                                   "federation.clients_per_round=2"), [24] * 4)
    shown = records.RoundRecord(
        round=1, result=RESULT, traffic=TRAFFIC, rejected=[2], train_losses=[0.5], seconds=2.0,
        epsilon=0.7, rule="fedavg", diagnostic=None, diagnostics={}, full_model_bytes=1000,
        model_privacy={"central": {"accuracy": 0.5}}, update_agreement=3.0).published(client)
    assert shown["clients"] is None and shown["seconds"] is None  # who took part, and for how long
    assert shown["model_privacy"] == {"central": {"accuracy": 0.5}}
    assert (shown["update_agreement"], shown["epsilon"]) == (3.0, 0.7)
