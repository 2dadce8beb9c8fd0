"""The privacy plan: one object per mode, built once; calibration, refusals, what is hidden."""

from __future__ import annotations

import pytest

from privlora.errors import ConfigError, PrivacyBudgetExceeded
from privlora.privacy import accounting
from privlora.privacy.plan import (
    SECURE,
    SEEDED,
    ClientLevel,
    LocalLevel,
    NoPrivacy,
    SampleLevel,
    make_plan,
    suggest_sample_rate,
)
from privlora.simulation import run

SIZES = [24, 24, 24, 24]
SAMPLE = ("privacy.mode=sample", "privacy.sample_rate=0.2")


def test_each_mode_builds_its_own_object(tiny_config):
    assert isinstance(make_plan(tiny_config(), SIZES), NoPrivacy)
    sample = make_plan(tiny_config(*SAMPLE, "privacy.noise_multiplier=1"), SIZES)
    client = make_plan(tiny_config("privacy.mode=client", "privacy.noise_multiplier=1",
                                   "federation.clients_per_round=2"), SIZES)
    local = make_plan(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1",
                                  "privacy.clip=0.5"), SIZES)
    assert isinstance(sample, SampleLevel) and isinstance(client, ClientLevel)
    assert isinstance(local, LocalLevel)
    assert sample.releases == 2 * 2 and client.releases == local.releases == 2
    assert (sample.sample_rate, client.sample_rate, local.sample_rate) == (0.2, 0.5, 1.0)
    assert local.sensitivity == 1.0 and local.noise_std == 1.0  # 2 x clip
    assert sample.training_mechanism().divisor == 4.0  # train.batch_size, not q * n
    assert client.central_mechanism().expected_count == 2.0  # q * N
    assert local.release_mechanism().clip == 0.5
    assert sample.central_mechanism() is None and local.training_mechanism() is None


def test_round_events_go_to_the_parties_each_mode_protects(tiny_config):
    sample = make_plan(tiny_config(*SAMPLE, "privacy.noise_multiplier=1"), SIZES)
    client = make_plan(tiny_config("privacy.mode=client", "privacy.noise_multiplier=1"), SIZES)
    local = make_plan(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1"), SIZES)
    assert sample.round_events([1, 3]) == {
        "client-1": accounting.sample_mode_event(0.2, 1.0, 2),
        "client-3": accounting.sample_mode_event(0.2, 1.0, 2)}
    assert client.round_events([1, 3]) == {"global": accounting.client_mode_event(1.0, 1.0, 1)}
    assert client.round_events([]) == client.round_events([0])  # noised even when empty
    assert local.round_events([2]) == {"client-2": accounting.local_mode_event(1.0, 1)}
    assert NoPrivacy().round_events([0, 1]) == {}


@pytest.mark.parametrize("mode, extra", [("sample", SAMPLE[1:]), ("client", ()), ("local", ())])
def test_calibration_lands_within_two_percent_below_the_target(tiny_config, mode, extra):
    plan = make_plan(tiny_config(f"privacy.mode={mode}", "privacy.target_epsilon=2", *extra),
                     SIZES)
    assert 0.98 * 2 <= plan.epsilon <= 2.0


def test_an_overspending_plan_refuses_before_anything_is_written(tiny_config, tmp_path):
    config = tiny_config(*SAMPLE, "privacy.noise_multiplier=0.3", "privacy.target_epsilon=1")
    with pytest.raises(PrivacyBudgetExceeded, match="privacy.noise_multiplier"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sample_mode_needs_a_configured_sample_rate(tiny_config):
    with pytest.raises(ConfigError, match=r"privacy\.sample_rate.*privacy plan"):
        make_plan(tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1"), SIZES)
    assert suggest_sample_rate(4, [10, 20, 40, 41]) == 4 / 40
    assert suggest_sample_rate(64, [10, 20]) == 1.0


def test_delta_is_checked_against_every_protected_unit(tiny_config):
    # sample mode protects each example: 96 in all, so delta must be < 1/96 (not 1/24)
    with pytest.raises(ConfigError, match=r"privacy\.delta \(population: all training"):
        make_plan(tiny_config(*SAMPLE, "privacy.noise_multiplier=1", "privacy.delta=0.02"), SIZES)
    make_plan(tiny_config(*SAMPLE, "privacy.noise_multiplier=1", "privacy.delta=0.01"), SIZES)
    with pytest.raises(ConfigError, match=r"privacy\.delta \(clients\)"):
        make_plan(tiny_config("privacy.mode=client", "privacy.noise_multiplier=1",
                              "privacy.delta=0.3"), SIZES)


def test_a_sample_rate_that_gives_huge_batches_is_refused(tiny_config):
    config = tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1.0",
                         "privacy.sample_rate=0.9")
    with pytest.raises(ConfigError, match="privacy.sample_rate"):
        make_plan(config, [2, 30, 30, 30])


def test_noise_is_secure_by_default_and_a_seed_is_disclosed(tiny_config):
    secure = make_plan(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1"), SIZES)
    seeded = make_plan(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1",
                                   "privacy.reproducible_noise=true"), SIZES)
    assert secure.noise_source == SECURE and secure.release_mechanism().secure
    assert seeded.noise_source == SEEDED and not seeded.release_mechanism().secure
    assert "does NOT hold against anyone who knows or guesses the seed" in SEEDED
    assert seeded.new_ledger().to_dict()["noise_source"] == SEEDED


def test_every_private_mode_hides_timing_and_client_mode_hides_participation(tiny_config):
    row = {"round": 1, "accuracy": 0.5, "seconds": 3.2, "train_loss": 0.7, "clients": [0, 2],
           "bytes_up": 10, "bytes_by_client": {"0": {"up": 5}}, "rejected": []}
    assert NoPrivacy().redact(row) == row
    for mode in ("sample", "local", "client"):
        extra = SAMPLE[1:] if mode == "sample" else ()
        plan = make_plan(tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=1",
                                     *extra), SIZES)
        shown = plan.redact(row)
        assert shown["seconds"] is None and shown["train_loss"] is None
        assert shown["accuracy"] == 0.5
        participation = [shown[k] for k in ("clients", "bytes_up", "bytes_by_client", "rejected")]
        assert (participation == [None] * 4) == (mode == "client")
        assert plan.hides_participation == (mode == "client")
