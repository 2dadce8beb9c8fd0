"""federation.stop_on_noise: a run whose model does not beat its floor on the server's eval set
stops, at no privacy cost (it reads only the released model and the server's own eval set); the
update agreement each round publishes is calibrated against pure noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privlora.errors import ConfigError
from privlora.evaluate import EvalResult, progress_margin
from privlora.privacy.signal import agreement
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
    assert float((zs < 2).float().mean()) > 0.95  # noise stays under 2
    direction = torch.randn(2000, generator=g)
    signal = [agreement(direction + 3 * torch.randn(2000, generator=g),
                        direction + 3 * torch.randn(2000, generator=g)) for _ in range(50)]
    assert min(signal) > 2  # one part in ten of the variance shared: 4.4 expected


def test_progress_margin_counts_standard_errors_over_the_floor():
    def result(accuracy, losses=(), examples=100):
        return EvalResult(accuracy, 1.0, math.e, examples, losses=tuple(losses))

    # classification: floor = max(zero-shot 0.3, majority 0.5); se = sqrt(0.25 / 100) = 0.05
    assert progress_margin(result(0.3), result(0.65), 0.5) == pytest.approx(3.0)
    assert progress_margin(result(0.3), result(0.55), 0.5) == pytest.approx(1.0)
    assert progress_margin(result(0.6), result(0.5), 0.5) < 0  # below zero-shot
    assert progress_margin(result(1.0), result(1.0), 0.5) == 0.0  # nothing left to beat
    # generation: the fall in loss over the paired error of the per-example differences
    before = [3.0, 2.0, 4.0, 3.5]
    after = [2.5, 1.7, 3.4, 3.2]
    diffs = np.subtract(before, after)
    expected = diffs.mean() / (diffs.std(ddof=1) / 2)
    zero_shot = EvalResult(None, float(np.mean(before)), 1.0, 4, losses=tuple(before))
    final = EvalResult(None, float(np.mean(after)), 1.0, 4, losses=tuple(after))
    assert progress_margin(zero_shot, final, None) == pytest.approx(expected, rel=1e-9)


def test_a_run_that_does_not_learn_stops_and_spends_only_the_rounds_it_ran(tiny_config, tmp_path,
                                                                         read_metrics):
    # a learning rate of 1e-12 does not move the adapter: every release is the server's noise
    config = tiny_config("federation.rounds=8", "federation.stop_on_noise=2",
                         "privacy.mode=client", "privacy.noise_multiplier=0.1",
                         "privacy.reproducible_noise=true", "train.lr=1e-12",
                         "federation.eval_every=8")
    summary = run(config, tmp_path / "noisy")
    rows = read_metrics(tmp_path / "noisy")
    assert summary["stopped_on_noise"] and summary["rounds_planned"] == 8
    assert summary["rounds"] == 2 and rows[-1]["round"] == 2  # two rounds without progress
    floor = max(rows[0]["accuracy"], summary["majority_class_accuracy"])
    se = math.sqrt(floor * (1 - floor) / 16)  # data.max_eval = 16
    assert all(r["accuracy"] - floor <= 2 * se for r in rows[1:])  # every round evaluated
    assert rows[1]["update_agreement"] is None and rows[2]["update_agreement"] is not None
    ledger = json.loads((tmp_path / "noisy" / "ledger.json").read_text())
    assert len(ledger["events"]["global"]) == 2


def test_a_learning_run_is_not_stopped(tiny_config, tmp_path, read_metrics):
    # a task the tiny random model learns in a few steps: the label word is the text
    rng = np.random.default_rng(0)
    words = rng.choice(["red", "blue"], size=240)
    easy = tmp_path / "easy.jsonl"
    easy.write_text("".join(json.dumps({"text": " ".join([w] * int(n)), "label": str(w)}) + "\n"
                            for w, n in zip(words, rng.integers(3, 9, size=240), strict=True)))
    summary = run(tiny_config(f"data.path={str(easy)!r}", "data.max_eval=40",
                              "federation.rounds=4", "federation.stop_on_noise=2",
                              "train.loss=label", "train.lr=0.01"), tmp_path / "learns")
    rows = read_metrics(tmp_path / "learns")
    assert not summary["stopped_on_noise"] and summary["rounds"] == 4
    floor = max(rows[0]["accuracy"], summary["majority_class_accuracy"])
    assert rows[-1]["accuracy"] - floor > 2 * math.sqrt(floor * (1 - floor) / 40)


def test_stop_on_noise_must_not_be_negative(tiny_config):
    with pytest.raises(ConfigError, match="stop_on_noise"):
        tiny_config("federation.stop_on_noise=-1")


def test_a_run_the_plan_calls_too_noisy_is_refused_before_any_spend(tiny_config, tmp_path):
    from privlora.simulation import prepare

    noisy = ("privacy.mode=client", "privacy.noise_multiplier=1000", "federation.rounds=8")
    with pytest.raises(ConfigError, match="cannot learn.*stop_on_noise = 0"):
        prepare(tiny_config(*noisy, "federation.stop_on_noise=2"))
    assert prepare(tiny_config(*noisy)).server.signal.verdict == "too noisy to learn"
