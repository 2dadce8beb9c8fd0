"""train.lr_schedule: the rate at each local step, and the client applying it at its round."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from privlora import client, protocol
from privlora.config import ConfigError, refuse_changes
from privlora.lr_schedule import scheduled_lr
from privlora.privacy.mechanisms import seeded_generator
from privlora.simulation import prepare


def test_constant_ignores_the_step():
    assert {scheduled_lr(0.02, "constant", s, 10) for s in range(12)} == {0.02}


def test_cosine_starts_at_lr_halves_midway_and_decreases_to_near_zero():
    rates = [scheduled_lr(0.02, "cosine", s, 8) for s in range(8)]
    assert rates[0] == 0.02
    assert rates[4] == pytest.approx(0.01)  # cos(pi / 2) = 0
    assert all(a > b for a, b in itertools.pairwise(rates))
    # the last of 8 steps: (1 + cos(7 pi / 8)) / 2 = sin^2(pi / 16)
    assert rates[-1] == pytest.approx(0.02 * math.sin(math.pi / 16) ** 2)
    assert rates[-1] > 0


def test_cosine_stays_at_its_last_rate_past_the_planned_steps():
    assert scheduled_lr(1.0, "cosine", 20, 8) == scheduled_lr(1.0, "cosine", 7, 8)


def test_unknown_schedule_or_bad_step_is_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr(0.1, "linear", 0, 4)
    with pytest.raises(ValueError, match="step -1"):
        scheduled_lr(0.1, "cosine", -1, 4)


def test_spec_spans_the_whole_run(tiny_config):
    sim = prepare(tiny_config("train.lr_schedule=cosine", "federation.rounds=3",
                              "train.local_steps=2"))
    spec = sim.sites[0].spec
    assert (spec.lr_schedule, spec.total_steps) == ("cosine", 6)


def test_a_step_takes_the_scheduled_rate(tiny_config):
    # Plain SGD: the update of one step is -rate x gradient, so the same batch at the run's
    # second of two steps (cosine: half the rate) gives exactly half the constant-rate update.
    sim = prepare(tiny_config("train.optimizer=sgd", "train.local_steps=1", "federation.rounds=2",
                              "train.lr=0.5"))
    site = sim.sites[0]
    deltas = {}
    for schedule in ("constant", "cosine"):
        spec = dataclasses.replace(site.spec, lr_schedule=schedule)
        deltas[schedule] = client.local_update(
            sim.handles, sim.init, site.examples, spec, seeded_generator(0, "b"),
            seeded_generator(0, "n"), sim.tokenizer.pad_token_id, first_step=1).delta
    assert deltas["constant"].keys() == deltas["cosine"].keys()
    moved = [n for n, t in deltas["constant"].items() if t.abs().max() > 0]
    assert moved
    for name in deltas["constant"]:
        torch.testing.assert_close(deltas["cosine"][name], 0.5 * deltas["constant"][name],
                                   rtol=1e-5, atol=1e-8)


def test_each_round_places_its_steps_in_the_run(tiny_config, monkeypatch):
    # run_round hands local_update the index of the round's first step: round 2 of 2-step rounds
    # takes the run's steps 2 and 3 (of 6)
    sim = prepare(tiny_config("train.lr_schedule=cosine", "federation.rounds=3",
                              "train.local_steps=2"))
    seen = []

    def spy(lr, schedule, step, total):
        seen.append((schedule, step, total))
        return scheduled_lr(lr, schedule, step, total)

    monkeypatch.setattr(client, "scheduled_lr", spy)
    site = sim.sites[0]
    down = protocol.downlink(sim.server.rule, sim.init, sim.server.ranks[site.client_id])
    client.run_round(sim.handles, sim.init, site, down, sim.config.seed, 2,
                     sim.tokenizer.pad_token_id)
    assert seen == [("cosine", 2, 6), ("cosine", 3, 6)]


def test_cosine_without_the_runs_length_is_refused(tiny_config):
    sim = prepare(tiny_config())
    spec = dataclasses.replace(sim.sites[0].spec, lr_schedule="cosine", total_steps=0)
    with pytest.raises(ValueError, match="total >= 1"):
        client.local_update(sim.handles, sim.init, sim.sites[0].examples, spec,
                            seeded_generator(0, "b"), seeded_generator(0, "n"),
                            sim.tokenizer.pad_token_id)


def test_a_resume_may_not_change_the_rounds_a_schedule_spans(tiny_config):
    saved = tiny_config("train.lr_schedule=cosine", "federation.rounds=3")
    refuse_changes(saved, saved)
    with pytest.raises(ConfigError, match=r"federation.rounds = 4 differs .*train.lr_schedule"):
        refuse_changes(saved, tiny_config("train.lr_schedule=cosine", "federation.rounds=4"))
    constant = tiny_config("federation.rounds=3")
    refuse_changes(constant, tiny_config("federation.rounds=4"))  # a constant rate may
