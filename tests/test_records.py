"""Published records: a round's row and the communication totals, shaped by the privacy plan."""

from __future__ import annotations

import pytest

from privlora import records
from privlora.evaluate import EvalResult
from privlora.privacy.plan import NoPrivacy, make_plan

RESULT = EvalResult(accuracy=0.5, loss=1.0, perplexity=2.718, examples=16)
TRAFFIC = {0: records.Traffic(up=110, down=100), 2: records.Traffic(up=130, down=100)}


def row(plan, diagnostics=None):
    return records.round_row(1, RESULT, TRAFFIC, [], [0.5, 1.5], 2.0, None, "fedavg",
                             "factor_gap", diagnostics or {}, 1000, plan)


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
