"""The one-run audit (Steinke, Nasr & Jagielski 2023): its bound against the paper's formula
computed independently here, and `privlora audit` on tiny runs: with DP the empirical lower
bound stays below the accountant's epsilon; without DP the white-box canaries show memorisation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privlora import client
from privlora.audit import DEFAULT_KINDS, InputCanaries, run_audit
from privlora.cli import app
from privlora.errors import ConfigError
from privlora.privacy.audit import (
    audit_bound,
    epsilon_lower_bound,
    gaussian_mu,
    guesses,
    ideal_gaussian_bound,
    p_value,
    roc_auc,
)


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value with the binomial pmf from log-gamma (independent of scipy)."""
    log_q, log_1q = -math.log1p(math.exp(-eps)), -math.log1p(math.exp(eps))
    pmf = [math.exp(math.lgamma(r + 1) - math.lgamma(k + 1) - math.lgamma(r - k + 1)
                    + k * log_q + (r - k) * log_1q) for k in range(r + 1)]
    beta = math.fsum(pmf[v:])
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):  # below = P[v > Binomial(r, q) >= v - i]
        below += pmf[v - i]
        alpha = max(alpha, below / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def _paper_bound(m, r, v, delta, confidence=0.95):
    lo, hi = 0.0, 30.0
    if _paper_p_value(m, r, v, 0.0, delta) > 1 - confidence:
        return 0.0
    for _ in range(60):  # bisection on the monotone p-value
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _paper_p_value(m, r, v, mid, delta) <= 1 - confidence else (lo, mid)
    return lo


def test_every_guess_right_matches_the_closed_form():
    # delta = 0, r = v = 100: q^100 = 0.05, so eps = log(q / (1 - q)) with q = 0.05^(1/100)
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 100, 0.0) == pytest.approx(math.log(q / (1 - q)),
                                                                    abs=1e-5)
    assert math.log(q / (1 - q)) == pytest.approx(3.4930, abs=1e-4)


@pytest.mark.parametrize(("m", "r", "v", "delta"), [
    (100, 100, 100, 1e-5), (1000, 200, 170, 1e-5), (1000, 100, 70, 1e-3), (500, 50, 30, 0.0),
    (1000, 1000, 600, 1e-5)])
def test_the_bound_matches_the_papers_formula_computed_independently(m, r, v, delta):
    for eps in (0.0, 0.5, 2.0):
        assert p_value(m, r, v, eps, delta) == pytest.approx(
            _paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)
    assert epsilon_lower_bound(m, r, v, delta) == pytest.approx(_paper_bound(m, r, v, delta),
                                                                abs=1e-5)


def test_chance_guessing_bounds_nothing_and_delta_only_lowers_the_bound():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 200, 170, 1e-3) < epsilon_lower_bound(1000, 200, 170, 0.0)


def test_guesses_take_the_top_and_bottom_scores():
    scores = [0.1, 0.9, 0.5, 0.2, 0.8, 0.3]
    included = [False, True, False, True, True, False]
    assert guesses(scores, included, 2, 2) == (4, 3)  # in: 0.9, 0.8 right; out: 0.1 right, 0.2 wrong
    assert roc_auc(scores, included) == pytest.approx(7 / 9)  # pairs in > out: 3 + 1 + 3
    bound = audit_bound(list(range(200)), [k >= 100 for k in range(200)], 1e-5)
    assert bound.correct == bound.guesses and bound.epsilon > 2  # perfect separation


def test_the_gaussian_reference_matches_its_definitions():
    # mu-GDP at mu = 1 is (eps, delta) with delta = Phi(-eps + 1/2) - e^eps Phi(-eps - 1/2)
    eps = 1.0
    delta = 0.5 * math.erfc((eps - 0.5) / math.sqrt(2)) - math.exp(eps) * 0.5 * math.erfc(
        (eps + 0.5) / math.sqrt(2))
    assert gaussian_mu(eps, delta) == pytest.approx(1.0, rel=1e-6)
    # the one-run method's ceiling grows with epsilon and with the canaries, and stays below eps
    ceilings = [ideal_gaussian_bound(e, 1e-5, 1000) for e in (2.0, 4.0, 8.0)]
    assert ceilings == sorted(ceilings) and all(c < e for c, e in zip(ceilings, (2, 4, 8)))
    assert ideal_gaussian_bound(8.0, 1e-5, 10_000) > ceilings[-1]
    assert ideal_gaussian_bound(math.inf, 1e-5, 1000) == math.inf


TINY_AUDIT = ("federation.num_clients=2", "train.local_steps=4", "train.batch_size=4")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_dp_the_lower_bound_stays_below_the_accountant(tiny_config, tmp_path, seed):
    config = tiny_config(*TINY_AUDIT, f"seed={seed}", "privacy.mode=sample",
                         "privacy.noise_multiplier=0.5", "privacy.sample_rate=0.1")
    # the input canaries' bound: test_input_canaries_stay_below_the_accountant (cheaper)
    result = run_audit(config, tmp_path / "audit", canaries=1000, kinds=("gradient",))
    for found in result["kinds"]:
        assert 0.0 <= found["epsilon_lower_bound"] <= result["epsilon_accountant"], found["kind"]
    assert math.isfinite(result["epsilon_accountant"]) and result["mode"] == "sample"
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    for key in ("epsilon_lower_bound", "epsilon_accountant", "delta", "confidence", "canaries",
                "guesses", "correct", "mode", "canary_kind", "auc"):
        assert key in saved, key
    # nothing of the canaries' run is kept: only the audit's own two files
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == ["audit.json", "audit.png"]


def test_without_dp_the_white_box_canaries_are_found(tiny_config, tmp_path):
    result = run_audit(tiny_config(*TINY_AUDIT), tmp_path / "audit", canaries=1000,
                       kinds=["gradient"])
    assert result["epsilon_accountant"] == math.inf
    assert DEFAULT_KINDS["none"] == ("gradient", "input")  # not the canary clients: see there
    assert result["kind"] == "gradient"  # the headline at the top level
    assert result["epsilon_lower_bound"] > 1.0 and result["auc"] > 0.7


PRIVATE = ("privacy.noise_multiplier=0.7", "privacy.reproducible_noise=false")


def test_input_canaries_stay_below_the_accountant(tiny_config, tmp_path):
    config = tiny_config(*TINY_AUDIT, "privacy.mode=sample", "privacy.noise_multiplier=0.5",
                         "privacy.sample_rate=0.1")
    result = run_audit(config, tmp_path / "audit", canaries=100, kinds=["input"])
    assert result["kind"] == "input" and result["canaries"] == 100
    assert 0.0 <= result["epsilon_lower_bound"] <= result["epsilon_accountant"] < math.inf


@pytest.mark.parametrize(("mode", "seed"), [("client", 0), ("client", 1), ("local", 0),
                                            ("local", 1)])
def test_canary_clients_and_releases_stay_below_the_accountant(tiny_config, tmp_path, mode,
                                                               seed):
    config = tiny_config(*TINY_AUDIT, f"seed={seed}", f"privacy.mode={mode}", *PRIVATE)
    # canary clients share one sum: 200 of them, in the tiny adapter's ~1,000 coordinates
    # (releases are each noised alone: 1,000)
    result = run_audit(config, tmp_path / "audit", canaries=200 if mode == "client" else 1000)
    assert result["kind"] == {"client": "client", "local": "release"}[mode]
    assert 0.0 < result["epsilon_lower_bound"] <= result["epsilon_accountant"] < math.inf
    # what the mechanism lets through is found: far from chance (measured 0.88-0.98)
    assert result["auc"] > 0.75


def test_without_dp_the_canary_clients_are_found(tiny_config, tmp_path):
    # 200, not 1,000: the tiny model's adapter has about 1,000 coordinates, and 500 random
    # directions in it would blur one another (real adapters have 10^4-10^5)
    result = run_audit(tiny_config(*TINY_AUDIT), tmp_path / "audit", canaries=200,
                       kinds=["client"])
    assert result["epsilon_lower_bound"] > 1.0 and result["auc"] > 0.9


@pytest.mark.parametrize("bug", ["local mode without its noise", "client mode without its clip"])
def test_the_audit_catches_a_broken_mechanism(tiny_config, tmp_path, monkeypatch, bug):
    """What the audit is for: a mechanism that releases more than the accountant charges for
    gives a lower bound above the accountant's epsilon."""
    if bug == "local mode without its noise":
        monkeypatch.setattr("privlora.privacy.client_dp.add_noise",
                            lambda tensors, *args, **kwargs: dict(tensors))
        config = tiny_config(*TINY_AUDIT, "privacy.mode=local", "privacy.noise_multiplier=3")
    else:
        monkeypatch.setattr("privlora.privacy.central.clip",
                            lambda tensors, norm: (dict(tensors), 1.0))
        config = tiny_config(*TINY_AUDIT, "privacy.mode=client", "privacy.noise_multiplier=3")
    result = run_audit(config, tmp_path / "audit", canaries=1000)
    assert result["epsilon_lower_bound"] > result["epsilon_accountant"]


def test_input_canaries_join_only_site_0_and_only_when_included(tiny_config, tmp_path,
                                                                monkeypatch):
    seen: dict[int, set] = {}
    real = client.local_update

    def spy(handles, start, examples, spec, *args, **kwargs):
        seen.setdefault(len(seen), set()).update(e.prompt for e in examples)
        return real(handles, start, examples, spec, *args, **kwargs)

    monkeypatch.setattr(client, "local_update", spy)
    config = tiny_config(*TINY_AUDIT, "federation.rounds=1")
    made = {}
    real_canaries = InputCanaries.__init__

    def keep(self, *args, **kwargs):
        real_canaries(self, *args, **kwargs)
        made["input"] = self

    monkeypatch.setattr(InputCanaries, "__init__", keep)
    result = run_audit(config, tmp_path / "audit", canaries=40, kinds=["input"])
    canaries = made["input"]
    inside = {e.prompt for e, x in zip(canaries.examples, canaries.included) if x}
    outside = {e.prompt for e, x in zip(canaries.examples, canaries.included) if not x}
    assert inside and outside and inside <= seen[0] and not outside & seen[0]
    assert not (inside | outside) & seen[1]  # the other site never holds one
    assert len(canaries.base) == 40 and result["kind"] == "input"
    assert InputCanaries([], (), [3.0, 1.0]).scores([1.0, 2.0]) == [2.0, -1.0]  # the loss drop


def test_the_audit_refuses_what_it_cannot_audit(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="do not apply to privacy.mode = 'local'"):
        run_audit(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1"), tmp_path,
                  kinds=["gradient"])
    with pytest.raises(ConfigError, match="at least 10"):
        run_audit(tiny_config(), tmp_path, canaries=3)
    result = CliRunner().invoke(app, ["audit", "--set", "privacy.mode=client", "--set",
                                      "privacy.noise_multiplier=1", "--kinds", "input",
                                      "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "do not apply" in result.output
    assert not Path(tmp_path / "a").exists()
