"""The noise-to-signal prediction, checked against the noise the real mechanisms draw."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from privlora.privacy.plan import make_plan
from privlora.privacy.signal import LEARNS, NO_LEARNING, noise_to_signal

SIZES = [2000, 2000, 2000, 2000]
SHAPES = {"l0.lora_B": (96, 2), "l1.lora_B": (64, 2)}  # d = 320
D = 320


def _zeros() -> dict[str, torch.Tensor]:
    return {name: torch.zeros(shape) for name, shape in SHAPES.items()}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors.values()))


def _mean_norm(draw, n: int = 200) -> float:
    torch.manual_seed(0)
    return sum(draw(torch.Generator().manual_seed(i)) for i in range(n)) / n


@pytest.mark.parametrize("mode, extra", [
    ("sample", ["privacy.sample_rate=0.01", "train.batch_size=20"]),
    ("client", ["federation.clients_per_round=2"]),
    ("local", []),
])
def test_per_release_ratio_is_the_noise_norm_the_mechanism_draws(tiny_config, mode, extra):
    plan = make_plan(tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=0.8",
                                 "privacy.clip=0.5", "privacy.reproducible_noise=true", *extra),
                     SIZES)
    participants = plan.expected_participants(4, 2)
    predicted = plan.noise_to_signal(D, participants).per_release
    if mode == "sample":  # a step with no example sampled: pure noise / divisor
        mechanism = plan.training_mechanism()
        measured = _mean_norm(lambda g: _norm(mechanism.noisy_gradient(_zeros(), g)))
    elif mode == "client":  # no update: the noised mean is pure noise
        mechanism = plan.central_mechanism()
        measured = _mean_norm(lambda g: _norm(mechanism.noisy_mean([], _zeros(), g)))
    else:  # a zero update released: pure noise
        mechanism = plan.release_mechanism()
        measured = _mean_norm(lambda g: _norm(mechanism.release(_zeros(), g)[0]))
    assert measured / 0.5 == pytest.approx(predicted, rel=0.03)  # ratio to the clip


@pytest.mark.parametrize("mode, extra, releases, divisor", [
    ("sample", ["privacy.sample_rate=0.01", "train.batch_size=20"], 3 * 5 * 4, 20),
    ("client", ["federation.clients_per_round=2"], 3, 2),  # one noised mean per round
    ("local", [], 3 * 4, 0.5),  # every client's release, std 2 sigma C
])
def test_whole_run_averages_the_releases_each_mode_makes(tiny_config, mode, extra, releases,
                                                         divisor):
    plan = make_plan(tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=1",
                                 "federation.rounds=3", "train.local_steps=5", *extra), SIZES)
    participants = plan.expected_participants(4, 2 if mode == "client" else 4)
    signal = plan.noise_to_signal(D, participants)
    assert signal.releases == releases
    assert signal.whole_run == pytest.approx(math.sqrt(D) / divisor / math.sqrt(releases))


def test_verdicts_follow_the_thresholds():
    assert noise_to_signal("a step", LEARNS, 1, 10, "", "n").verdict == "learns"
    assert noise_to_signal("a step", NO_LEARNING, 1, 10, "", "n").verdict == "marginal"
    assert noise_to_signal("a step", NO_LEARNING * 1.01, 1, 10, "", "n").verdict == "too noisy to learn"
    assert noise_to_signal("a step", LEARNS, 1, 10, "", "n").fixes() == []


@pytest.mark.parametrize("mode", ["sample", "client", "local"])
def test_each_suggested_fix_reaches_the_target(tiny_config, mode):
    extra = {"sample": ["privacy.sample_rate=0.01", "train.batch_size=20"],
             "client": ["federation.clients_per_round=2"], "local": []}[mode]
    config = tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=3", *extra)
    plan = make_plan(config, SIZES)
    signal = plan.noise_to_signal(D, 2.0)
    factor = signal.whole_run / LEARNS
    assert factor > 1
    fixes = signal.fixes()
    # apply each knob to the plan itself and recompute: every fix lands on the target
    fewer = plan.noise_to_signal(D / factor**2, 2.0).whole_run
    assert fewer == pytest.approx(LEARNS, rel=0.02) and "to under" in fixes[-2]
    if mode == "sample":  # examples per step: the divisor grows by the factor
        wider = dataclasses.replace(plan, divisor=plan.divisor * factor)
        assert wider.noise_to_signal(D, 2.0).whole_run == pytest.approx(LEARNS)
        assert fixes[0].startswith(f"x{factor:.1f} examples per step")
    if mode == "client":  # clients per round: the noised mean's divisor grows by the factor
        assert plan.noise_to_signal(D, 2.0 * factor).whole_run == pytest.approx(LEARNS)
        assert fixes[0].startswith(f"x{factor:.1f} clients per round")
    if mode == "local":  # no linear knob: batch size does not enter local mode's release
        assert len(fixes) == 2
    more = dataclasses.replace(plan, rounds=plan.rounds * factor**2)
    assert more.noise_to_signal(D, 2.0).whole_run == pytest.approx(LEARNS)


def test_privacy_plan_prints_the_call_and_its_fixes(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from privlora.cli import app

    config = tmp_path / "c.toml"
    config.write_text('[model]\nname = "tiny-random"\n[data]\nbuiltin_examples = 40\n'
                      '[privacy]\nmode = "local"\nnoise_multiplier = 2.0\n')
    result = CliRunner().invoke(app, ["privacy", "plan", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    signal = report["noise_to_signal"]
    assert signal["verdict"] == "too noisy to learn" and signal["fixes"]
    assert "TOO NOISY TO LEARN" in report["text"] and "epsilon" in report["text"]
