"""A client's round: local DP noise, size-independent sample-mode releases, non-finite examples."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from privlora import client, protocol
from privlora.client import Site
from privlora.lora import set_trainable, trained_parameters, write_adapter
from privlora.privacy.client_dp import LocalDP, SampleDP
from privlora.privacy.mechanisms import joint_l2_norm, seeded_generator
from privlora.simulation import prepare

# sample mode at q = 0.5 with seeded noise: two runs of one round can be compared exactly
REPRODUCIBLE_SAMPLE_MODE = ("privacy.mode=sample", "privacy.noise_multiplier=1",
                            "privacy.sample_rate=0.5", "privacy.reproducible_noise=true")


def one_round(sim, site, round_=1):
    down = protocol.downlink(sim.server.rule, sim.init, sim.server.ranks[site.client_id])
    return client.run_round(sim.handles, sim.init, site, down, sim.config.seed, round_,
                            sim.tokenizer.pad_token_id)


def test_spec_follows_the_rule_and_the_privacy_plan(tiny_config):
    sample = prepare(tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1",
                                 "privacy.sample_rate=0.25", "federation.aggregation=ffa"))
    spec = sample.sites[0].spec
    assert spec.train_a is False and spec.local_dp is None
    assert spec.sample_dp == SampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=0.25,
                                      divisor=4.0, secure=True)
    local = prepare(tiny_config("privacy.mode=local", "privacy.noise_multiplier=2",
                                "federation.aggregation=exact", "lora.client_ranks=[2, 8]"))
    assert [s.spec.rank for s in local.sites] == [2, 8, 2, 8]
    assert local.sites[0].spec.local_dp == LocalDP(clip=1.0, noise_multiplier=2.0, secure=True)


def test_without_dp_the_update_carries_its_count_and_loss(tiny_config):
    sim = prepare(tiny_config())
    up = one_round(sim, sim.sites[0])
    assert up.meta["num_examples"] == len(sim.sites[0].examples)
    assert up.meta["train_loss"] > 0


@pytest.mark.parametrize("mode, extra", [("sample", "privacy.sample_rate=0.25"),
                                         ("local", "privacy.clip=0.5"),
                                         ("client", "privacy.clip=0.5")])
def test_under_dp_only_the_update_leaves(tiny_config, mode, extra):
    sim = prepare(tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=1", extra))
    up = one_round(sim, sim.sites[0])
    assert up.meta == {}  # no example count, no loss (not even to client mode's trusted server)
    assert protocol.is_finite(up)


def test_local_mode_noise_has_the_stated_std(tiny_config):
    # With a vanishing learning rate the update is pure noise of std sigma * 2 * clip.
    sim = prepare(tiny_config("privacy.mode=local", "privacy.noise_multiplier=0.5",
                              "privacy.clip=0.1", "train.optimizer=sgd", "train.lr=1e-12",
                              "federation.num_clients=1"))
    values = torch.cat([v.flatten() for v in one_round(sim, sim.sites[0]).tensors.values()])
    assert values.std().item() == pytest.approx(0.5 * 2 * 0.1, rel=0.05)
    assert abs(values.mean().item()) < 0.01


def test_a_sample_mode_release_does_not_reveal_the_clients_size(tiny_config):
    # Two clients with n and n + 1 examples, same config and seeds. The noise is one draw at one
    # scale, sigma * clip / train.batch_size, whatever n; so with plain SGD their updates differ
    # only by the clipped signal, at most lr / batch_size * steps * (2n + 1) * clip. (Dividing
    # by q * n_k, as before, scaled the noise by 1/n_k: the difference was the noise / n.)
    sim = prepare(tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1000",
                              "privacy.sample_rate=0.2", "privacy.clip=0.01",
                              "privacy.reproducible_noise=true", "train.optimizer=sgd",
                              "train.lr=0.001", "train.local_steps=3"))
    examples, spec = sim.sites[0].examples, sim.sites[0].spec
    n = len(examples) - 1
    small, big = one_round(sim, Site(0, examples[:n], spec)), one_round(sim, Site(0, examples, spec))
    assert small.meta == big.meta == {}
    difference = joint_l2_norm({k: small.tensors[k] - big.tensors[k] for k in small.tensors})
    bound = 0.001 / 4 * 3 * (2 * n + 1) * 0.01
    noise = joint_l2_norm(big.tensors)
    assert difference <= bound * (1 + 1e-3)
    assert noise > 50 * bound  # the test would see a noise scale that moved with n


def test_a_nonfinite_example_counts_as_zero_and_the_round_goes_on(tiny_config, caplog):
    sim = prepare(tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1",
                              "privacy.sample_rate=1.0", "train.batch_size=24"))
    embed = sim.handles.model.get_base_model().get_input_embeddings()

    def poison_first_row(module, inputs, output):  # example 0 of every batch turns NaN
        output = output.clone()
        output[0] = float("nan")
        return output

    hook = embed.register_forward_hook(poison_first_row)
    try:
        spec = sim.sites[0].spec
        result = client.local_update(
            sim.handles, sim.init, sim.sites[0].examples, spec, seeded_generator(0, "b"),
            seeded_generator(0, "n"), sim.tokenizer.pad_token_id)
        with caplog.at_level(logging.WARNING, logger="privlora.local"):
            up = one_round(sim, sim.sites[0])
    finally:
        hook.remove()
    assert result.local_log["nonfinite_examples"] == spec.steps  # one per step, q = 1
    assert all(torch.isfinite(t).all() for t in result.delta.values())
    assert protocol.is_finite(up) and up.meta == {}  # the count stays with the client
    assert "nonfinite_examples" in caplog.text


def test_local_release_of_a_nonfinite_update_is_noise_around_zero():
    update = {"w": torch.tensor([1.0, float("inf"), 2.0])}
    noised, finite = LocalDP(clip=1.0, noise_multiplier=0.0, secure=False).release(
        update, torch.Generator())
    assert not finite and torch.equal(noised["w"], torch.zeros(3))



@pytest.mark.parametrize("private", [False, True])
def test_a_batch_split_into_microbatches_gives_the_same_step(tiny_config, private):
    extra = REPRODUCIBLE_SAMPLE_MODE if private else ()
    sim = prepare(tiny_config("train.batch_size=12", *extra))
    site = sim.sites[0]
    assert len(site.examples) >= 20  # q = 0.5 or a batch of 12: several chunks of 5
    grads = []
    for microbatch in (100, 5):  # one forward, then chunks of 5
        spec = dataclasses.replace(site.spec, microbatch=microbatch)
        write_adapter(sim.handles, sim.init)
        set_trainable(sim.handles, train_a=spec.train_a)
        named = trained_parameters(sim.handles, spec.train_a)
        for p in named.values():
            p.grad = None
        step = client.gradient_step(sim.handles, site.examples, spec, named,
                                    seeded_generator(1, "b"), seeded_generator(1, "n"),
                                    sim.tokenizer.pad_token_id)
        grads.append(({k: p.grad.clone() for k, p in named.items()}, step))
    (whole, whole_step), (split, split_step) = grads
    assert whole_step.tokens == split_step.tokens > 0
    assert split_step.loss == pytest.approx(whole_step.loss, rel=1e-5)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)


def _step_grads(sim, spec, site):
    write_adapter(sim.handles, sim.init)
    set_trainable(sim.handles, train_a=spec.train_a)
    named = trained_parameters(sim.handles, spec.train_a)
    for p in named.values():
        p.grad = None
    client.gradient_step(sim.handles, site.examples, spec, named, seeded_generator(1, "b"),
                         seeded_generator(1, "n"), sim.tokenizer.pad_token_id)
    return named, {k: p.grad.clone() for k, p in named.items()}


@pytest.mark.parametrize("loss", ["answer", "label"])
def test_a_chunked_step_equals_the_textbook_step(tiny_config, loss):
    from privlora.data import collate
    from privlora.lm import per_example_loss
    from privlora.privacy.mechanisms import clip

    # non-private: the gradient of the batch's mean loss, one forward
    sim = prepare(tiny_config("train.batch_size=12", f"train.loss={loss}"))
    site = sim.sites[0]
    assert bool(site.spec.label_tokens) == (loss == "label")
    spec = dataclasses.replace(site.spec, microbatch=5)
    named, chunked = _step_grads(sim, spec, site)
    batch = client._uniform_batch(site.examples, 12, seeded_generator(1, "b"))
    for p in named.values():
        p.grad = None
    per_example_loss(sim.handles.model, collate(batch, sim.tokenizer.pad_token_id),
                     spec.label_tokens).mean().backward()
    for name, p in named.items():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-7)

    # DP-SGD with q = 1: one backward per example, joint clip, sum, the same noise, / divisor
    sim = prepare(tiny_config("privacy.mode=sample", "privacy.noise_multiplier=0.5",
                              "privacy.sample_rate=1.0", "train.batch_size=24",
                              "privacy.clip=0.01", "privacy.reproducible_noise=true",
                              f"train.loss={loss}"))
    site = sim.sites[0]
    spec = dataclasses.replace(site.spec, microbatch=5)
    named, chunked = _step_grads(sim, spec, site)
    total = {k: torch.zeros_like(p) for k, p in named.items()}
    for example in site.examples:
        for p in named.values():
            p.grad = None
        per_example_loss(sim.handles.model, collate([example], sim.tokenizer.pad_token_id),
                         spec.label_tokens).sum().backward()
        clipped, _ = clip({k: p.grad for k, p in named.items()}, 0.01)
        total = {k: total[k] + clipped[k] for k in total}
    expected = spec.sample_dp.noisy_gradient(total, seeded_generator(1, "n"))
    for name in named:
        torch.testing.assert_close(chunked[name], expected[name], rtol=1e-4, atol=1e-7)


def test_sgd_momentum_is_heavy_ball_from_the_config(tiny_config):
    sim = prepare(tiny_config("train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.5"))
    spec = sim.sites[0].spec
    assert (spec.optimizer, spec.momentum) == ("sgd", 0.9)
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer = client._optimizer([w], spec)
    g = torch.tensor([1.0, -2.0, 0.5])
    for _ in range(2):  # velocity v1 = g, v2 = 0.9 v1 + g; w = -lr (v1 + v2)
        w.grad = g.clone()
        optimizer.step()
    torch.testing.assert_close(w.detach(), -0.5 * (g + 1.9 * g))


@pytest.mark.parametrize("private", [False, True])
def test_gradient_checkpointing_gives_the_same_round(tiny_config, private):
    extra = REPRODUCIBLE_SAMPLE_MODE if private else ()
    sim = prepare(tiny_config("train.local_steps=3", *extra))
    site = sim.sites[0]
    deltas = []
    for setting in ("off", "on"):
        spec = dataclasses.replace(site.spec, gradient_checkpointing=setting)
        deltas.append(client.local_update(
            sim.handles, sim.init, site.examples, spec, seeded_generator(0, "b"),
            seeded_generator(0, "n"), sim.tokenizer.pad_token_id).delta)
    assert not sim.handles.model.get_base_model().is_gradient_checkpointing  # off again
    for name in deltas[0]:
        torch.testing.assert_close(deltas[1][name], deltas[0][name], rtol=1e-4, atol=1e-6)
    assert any(bool(t.abs().sum() > 0) for t in deltas[0].values())


def test_auto_checkpoints_big_models_only(tiny_model):
    from privlora.models import CHECKPOINT_ABOVE, wants_checkpointing

    assert sum(p.numel() for p in tiny_model.parameters()) < CHECKPOINT_ABOVE
    assert not wants_checkpointing("auto", tiny_model)
    assert wants_checkpointing("on", tiny_model) and not wants_checkpointing("off", tiny_model)
