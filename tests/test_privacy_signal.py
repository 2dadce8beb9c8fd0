"""The noise-to-signal prediction, checked against the noise the real mechanisms draw."""

from __future__ import annotations

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


def test_whole_run_averages_steps_and_clients_in_sample_mode(tiny_config):
    plan = make_plan(tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1",
                                 "privacy.sample_rate=0.01", "train.batch_size=20",
                                 "federation.rounds=3", "train.local_steps=5"), SIZES)
    signal = plan.noise_to_signal(D, 4)
    assert signal.releases == 3 * 5 * 4
    assert signal.whole_run == pytest.approx(math.sqrt(D) / 20 / math.sqrt(60))


def test_verdicts_and_fixes_follow_the_thresholds():
    assert noise_to_signal(LEARNS, 1, 10).verdict == "learns"
    assert noise_to_signal(NO_LEARNING, 1, 10).verdict == "marginal"
    assert noise_to_signal(NO_LEARNING * 1.01, 1, 10).verdict == "too noisy to learn"
    assert noise_to_signal(LEARNS, 1, 10).fixes() == []
    fixes = noise_to_signal(4 * LEARNS, 1, 160_000).fixes()
    assert fixes[0].startswith("x4.0 examples") and "to under 10,000" in fixes[1]


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
