"""federation.stop_on_noise: a run whose released global updates agree from round to round no
more than noise stops, at no privacy cost (it reads only what was released)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privlora.errors import ConfigError
from privlora.privacy.signal import NOISE_AGREEMENT, agreement
from privlora.simulation import run


def test_agreement_is_the_cosine_times_root_d_computed_independently():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(size=300)
    a[:20] = b[:20] = 0.0  # coordinates that moved in neither do not count
    expected = a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) * math.sqrt(280)
    assert agreement(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-9)
    assert agreement(torch.zeros(5), torch.ones(5)) == 0.0


def test_independent_noise_agrees_like_a_standard_normal_and_a_shared_direction_does_not():
    g = torch.Generator().manual_seed(0)
    zs = torch.tensor([agreement(torch.randn(2000, generator=g), torch.randn(2000, generator=g))
                       for _ in range(2000)])
    # mean 0 and sd 1 within 5 standard errors (sd of the mean 0.022, of the sd about 0.016)
    assert abs(float(zs.mean())) < 0.12 and abs(float(zs.std()) - 1) < 0.08
    assert float((zs < NOISE_AGREEMENT).float().mean()) > 0.95  # noise is called noise
    direction = torch.randn(2000, generator=g)
    signal = [agreement(direction + 3 * torch.randn(2000, generator=g),
                        direction + 3 * torch.randn(2000, generator=g)) for _ in range(50)]
    assert min(signal) > NOISE_AGREEMENT  # one part in ten of the variance shared: 4.4 expected


def test_a_run_drowned_in_noise_stops_and_spends_only_the_rounds_it_ran(tiny_config, tmp_path,
                                                                          read_metrics):
    # the plan's forecast assumes training moves the adapter; a learning rate of 1e-12 does not,
    # so every released update is the server's noise alone
    config = tiny_config("federation.rounds=8", "federation.stop_on_noise=2",
                         "privacy.mode=client", "privacy.noise_multiplier=0.1",
                         "train.lr=1e-12", "federation.eval_every=8")
    summary = run(config, tmp_path / "noisy")
    rows = read_metrics(tmp_path / "noisy")
    assert summary["stopped_on_noise"] and summary["rounds_planned"] == 8
    ran = summary["rounds"]
    assert 3 <= ran < 8 and rows[-1]["round"] == ran
    assert rows[1]["update_agreement"] is None  # round 1 has no round before it
    quiet = [r["update_agreement"] < NOISE_AGREEMENT for r in rows[-2:]]
    assert all(quiet) and rows[-1]["accuracy"] is not None  # the stopping round is evaluated
    ledger = json.loads((tmp_path / "noisy" / "ledger.json").read_text())
    assert len(ledger["events"]["global"]) == ran


def test_a_learning_run_is_not_stopped(tiny_config, tmp_path, read_metrics):
    summary = run(tiny_config("federation.rounds=4", "federation.stop_on_noise=1",
                              "train.lr=0.01"), tmp_path / "learns")
    agreements = [r["update_agreement"] for r in read_metrics(tmp_path / "learns")[2:]]
    assert not summary["stopped_on_noise"] and summary["rounds"] == 4
    assert min(agreements) > NOISE_AGREEMENT


def test_stop_on_noise_must_not_be_negative(tiny_config):
    with pytest.raises(ConfigError, match="stop_on_noise"):
        tiny_config("federation.stop_on_noise=-1")


def test_a_run_the_plan_calls_too_noisy_is_refused_before_any_spend(tiny_config, tmp_path):
    from privlora.simulation import prepare

    noisy = ("privacy.mode=client", "privacy.noise_multiplier=1000", "federation.rounds=8")
    with pytest.raises(ConfigError, match="cannot learn.*stop_on_noise = 0"):
        prepare(tiny_config(*noisy, "federation.stop_on_noise=2"))
    assert prepare(tiny_config(*noisy)).server.signal.verdict == "too noisy to learn"
