"""A site's own budget (privacy.site): its policy, its ledger across runs, its refusals; the
simulation's sites refuse as a deployed site would, and the server goes on without them."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from typer.testing import CliRunner

from privlora import simulation
from privlora.cli import app
from privlora.errors import ConfigError, RoundFailed
from privlora.privacy.central import CentralDP
from privlora.privacy.client_dp import LocalDP, SampleDP
from privlora.privacy.plan import make_plan
from privlora.privacy.site import (
    CLAIMED,
    SiteBudget,
    SitePolicy,
    SiteRefused,
    fingerprint,
    release_of,
    site_epsilon,
    spend_by_run,
)

CAPPED = SitePolicy(max_epsilon=3.0, delta=1e-5, modes=("sample", "local"))
SAMPLE = SampleDP(clip=1.0, noise_multiplier=1.1, sample_rate=0.05, divisor=8.0, secure=True)


def _pld_epsilon(events, delta):
    """An independent PLD epsilon: dp-accounting's accountant fed one event at a time."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for event in events:
        acc.compose(event)
    return acc.get_epsilon(delta)


def test_the_site_charges_what_its_own_mechanism_applies(tmp_path):
    budget = SiteBudget(CAPPED, tmp_path / "ledger.json", "data")
    release = release_of(6, SAMPLE, None, None)
    spent = [budget.spend(release, "run-a", r, f"down-{r}") for r in (1, 2, 3)]
    gaussian = dp_accounting.GaussianDpEvent(1.1)
    step = dp_accounting.PoissonSampledDpEvent(0.05, gaussian)
    assert spent[-1] == pytest.approx(_pld_epsilon([step] * 18, 1e-5), rel=2e-3)
    assert spent[0] < spent[1] < spent[2] < 3.0
    # a new process (a new object) reads the same file: the spend persists across restarts
    again = SiteBudget(CAPPED, tmp_path / "ledger.json", "data")
    assert again.spend(release, "run-b", 1, "down-x") > spent[-1]
    book = json.loads((tmp_path / "ledger.json").read_text())
    assert [e["run"] for e in book["datasets"]["data"]] == ["run-a"] * 3 + ["run-b"]


def test_a_release_past_the_cap_is_refused_and_not_recorded(tmp_path):
    budget = SiteBudget(CAPPED, tmp_path / "ledger.json", "data")
    big = release_of(1, None, LocalDP(clip=1.0, noise_multiplier=2.0, secure=True), None)
    budget.spend(big, "run", 1, "d1")
    before = (tmp_path / "ledger.json").read_bytes()
    with pytest.raises(SiteRefused, match=r"over its max-epsilon = 3.0"):
        for r in range(2, 20):
            budget.spend(big, "run", r, f"d{r}")
    book = json.loads((tmp_path / "ledger.json").read_text())
    total = site_epsilon([dp_accounting.GaussianDpEvent(2.0)] * len(book["datasets"]["data"]), 1e-5)
    assert total <= 3.0
    assert len(book["datasets"]["data"]) == 2 and (tmp_path / "ledger.json").read_bytes() != before
    # another data file at the same site has its own budget
    other = SiteBudget(CAPPED, tmp_path / "ledger.json", "other-data")
    assert other.spend(big, "run", 1, "d1") < 3.0


def test_a_repeated_round_is_free_only_when_its_release_is_the_same(tmp_path):
    seeded = release_of(1, None, LocalDP(clip=1.0, noise_multiplier=2.0, secure=False), None)
    secure = release_of(1, None, LocalDP(clip=1.0, noise_multiplier=2.0, secure=True), None)
    budget = SiteBudget(CAPPED, tmp_path / "l.json", "data")
    first = budget.spend(seeded, "run", 1, "down")
    assert budget.spend(seeded, "run", 1, "down") == first  # the same values again
    assert budget.spend(seeded, "run", 1, "other-down") > first  # a different downlink
    fresh = SiteBudget(CAPPED, tmp_path / "m.json", "data")
    once = fresh.spend(secure, "run", 1, "down")
    assert fresh.spend(secure, "run", 1, "down") > once  # OS-random noise: a new release


@pytest.mark.parametrize(("policy", "release", "why"), [
    (CAPPED, release_of(1, None, None, CentralDP(1.0, 1.0, 2.0, True)), "modes this site"),
    (CAPPED, release_of(1, None, None, None), "allow-non-private = true"),
    (SitePolicy(), release_of(1, SAMPLE, None, None), "no max-epsilon and delta"),
])
def test_the_policy_refuses_a_mode_it_does_not_accept(tmp_path, policy, release, why):
    with pytest.raises(SiteRefused, match=why):
        SiteBudget(policy, tmp_path / "l.json", "d").spend(release, "run", 1, "down")
    assert not (tmp_path / "l.json").exists()


@pytest.mark.parametrize("mechanism", [
    (LocalDP(clip=1.0, noise_multiplier=0.0, secure=True), "adds no noise"),
    (LocalDP(clip=0.0, noise_multiplier=1.0, secure=True), "bounds nothing"),
    (LocalDP(clip=math.inf, noise_multiplier=1.0, secure=True), "bounds nothing"),
])
def test_a_mechanism_without_noise_or_clip_is_refused(mechanism):
    local, why = mechanism
    with pytest.raises(SiteRefused, match=why):
        release_of(1, None, local, None)


def test_client_mode_is_charged_as_the_servers_claim_without_sampling_credit():
    release = release_of(3, None, None, CentralDP(clip=0.5, noise_std=0.6, expected_count=2.0,
                                                  secure=True))
    assert release.mode == "client" and release.source == CLAIMED
    assert release.event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(1.2), 1)


def test_non_private_releases_make_the_total_infinite(tmp_path):
    policy = SitePolicy(max_epsilon=8.0, delta=1e-5, allow_non_private=True)
    budget = SiteBudget(policy, tmp_path / "l.json", "d")
    assert budget.spend(release_of(1, None, None, None), "run", 1, "down") == math.inf
    with pytest.raises(SiteRefused, match="over its max-epsilon"):  # nothing is left to cap
        budget.spend(release_of(1, SAMPLE, None, None), "run2", 1, "down")


def test_node_config_policy_and_its_errors():
    node = {"max-epsilon": 8, "delta": 1e-6, "modes": "sample, client",
            "allow-non-private": "false"}
    assert SitePolicy.from_node_config(node) == SitePolicy(8.0, 1e-6, ("sample", "client"), False)
    for bad, why in [({"max-epsilon": 8}, "without its delta"),
                     ({"modes": "sample,central"}, r"\['central'\]"),
                     ({"max-epsilon": "eight", "delta": 1e-5}, "must be a number"),
                     ({"allow-non-private": "yes"}, "true or false")]:
        with pytest.raises(ConfigError, match=why):
            SitePolicy.from_node_config(bad)


def test_the_site_and_the_server_charge_the_same_events(tiny_config):
    for mode in (("privacy.mode=local", "privacy.noise_multiplier=1.3"),
                 ("privacy.mode=sample", "privacy.noise_multiplier=1.3",
                  "privacy.sample_rate=0.2")):
        config = tiny_config(*mode)
        plan = make_plan(config, None)
        release = release_of(config.train.local_steps, plan.training_mechanism(),
                             plan.release_mechanism(), None)
        assert release.event == plan.round_events([0])["client-0"]


def test_fingerprint_follows_the_bytes(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": "y"}\n')
    before = fingerprint(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": "z"}\n')
    assert fingerprint(tmp_path / "a.jsonl") != before and len(before) == 64


LOCAL = ("privacy.mode=local", "privacy.noise_multiplier=2.0", "privacy.clip=0.5",
         "federation.num_clients=2", "federation.rounds=3", "site.delta=1e-5")


def test_the_simulation_goes_on_without_a_site_that_refuses(tiny_config, tmp_path, caplog,
                                                            read_metrics):
    """Client 1's data already spent most of its cap in an earlier run: it takes part until
    its own ledger says no; the server logs why and trains on with client 0."""
    shared = tmp_path / "ledgers"
    config = tiny_config(*LOCAL, "site.max_epsilon=4.6", f"site.ledger_dir='{shared}'")
    sim = simulation.with_site_budgets(simulation.prepare(config), tmp_path / "unused")
    earlier = release_of(1, None, sim.sites[1].spec.local_dp, None)
    for r in range(3):
        sim.sites[1].budget.spend(earlier, "an-earlier-run", r, "d")
    with caplog.at_level("WARNING", logger="privlora.local"):
        summary = simulation.run(config, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")[1:]
    assert [r["rejected"] for r in rows] == [[], [1], [1]]
    assert "client 1 left out: site refused: this round would bring the site's epsilon" in \
        caplog.text
    site1 = json.loads((shared / "client-1.json").read_text())
    runs = [e["run"] for entries in site1["datasets"].values() for e in entries]
    assert runs.count("an-earlier-run") == 3 and len(runs) == 4  # round 1 only
    site0 = json.loads((shared / "client-0.json").read_text())
    server_ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    site_events = [e["event"] for entries in site0["datasets"].values() for e in entries]
    assert site_events == server_ledger["events"]["client-0"]  # the two ledgers agree
    assert summary["final"]["accuracy"] is not None
    assert spend_by_run(shared / "client-1.json")[-1]["epsilon"] == pytest.approx(4.377, abs=2e-3)


def test_the_simulation_stops_when_every_site_refuses_the_mode(tiny_config, tmp_path):
    config = tiny_config(*LOCAL, "site.max_epsilon=8", "site.modes=['sample']")
    with pytest.raises(RoundFailed, match="0 of 2 clients"):
        simulation.run(config, tmp_path / "run")


def test_site_budget_prints_each_run_and_the_total(tmp_path):
    budget = SiteBudget(CAPPED, tmp_path / "l.json", "abcdef0123456789")
    release = release_of(4, SAMPLE, None, None)
    for run in ("run-one", "run-two"):
        budget.spend(release, run, 1, "d")
    result = CliRunner().invoke(app, ["site", "budget", "--ledger", str(tmp_path / "l.json")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[3] for line in lines] == ["run-one", "run-two", "total"]
    eps = [float(line.split()[-1]) for line in lines]
    assert eps[0] == eps[1] < eps[2]
    missing = CliRunner().invoke(app, ["site", "budget", "--ledger", str(tmp_path / "no")])
    assert missing.exit_code == 2 and "no such file" in missing.output
