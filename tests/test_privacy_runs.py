"""Privacy modes end to end on the tiny Llama: ledger, budget refusal, what is clipped and noised."""

import json

import pytest
import torch
from safetensors.torch import load_file

from privlora.communication import payload_bytes
from privlora.config import load_config
from privlora.errors import ConfigError, PrivacyBudgetExceeded
from privlora.lora import flatten, read_adapter
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.plan import make_plan
from privlora.server import prepare, run

TINY = ["model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=120",
        "data.max_eval=16", "federation.rounds=2", "train.local_steps=2", "train.batch_size=4"]


def tiny_config(*extra):
    return load_config(None, TINY + list(extra))


@pytest.mark.parametrize("mode", ["sample", "client", "local"])
def test_each_mode_spends_at_most_its_target(mode, tmp_path):
    summary = run(tiny_config(f"privacy.mode={mode}", "privacy.target_epsilon=8"), tmp_path)
    ledger = PrivacyLedger.from_dict(json.loads((tmp_path / "ledger.json").read_text()))
    spent = ledger.epsilon(accountant="pld")
    assert 0 < spent <= 8.0
    p = summary["privacy"]
    assert p["epsilon_spent_pld"] == pytest.approx(spent)
    assert p["neighbouring"] == ledger.to_dict()["neighbouring"]
    assert p["epsilon_planned"] >= spent * (1 - 1e-9)
    if mode == "local":
        assert p["sensitivity"] == 2 * p["clip"]
        assert "2 x clip" in p["neighbouring"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(spent)
    assert (tmp_path / "checkpoints/round_002/ledger.json").is_file()
    parties = ledger.parties()
    assert parties == (["global"] if mode == "client" else [f"client-{i}" for i in range(4)])


def test_plan_calibrates_to_within_two_percent_below_target():
    for mode in ["sample", "client", "local"]:
        plan = make_plan(tiny_config(f"privacy.mode={mode}", "privacy.target_epsilon=2"),
                         [24, 24, 24, 24])
        assert 0.98 * 2 <= plan.epsilon <= 2.0


def test_overspending_plan_refuses_before_training(tmp_path):
    config = tiny_config("privacy.mode=sample", "privacy.noise_multiplier=0.3",
                         "privacy.target_epsilon=1")
    with pytest.raises(PrivacyBudgetExceeded, match="privacy.noise_multiplier"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing was written, nothing spent


def test_delta_must_be_below_one_over_population():
    config = tiny_config("privacy.mode=client", "privacy.noise_multiplier=1", "privacy.delta=0.5")
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        prepare(config)


def test_local_mode_noise_has_the_stated_std(tmp_path):
    # With a vanishing learning rate the update is pure noise of std sigma * 2 * clip.
    config = tiny_config("privacy.mode=local", "privacy.noise_multiplier=0.5",
                         "privacy.clip=0.1", "train.optimizer=sgd", "train.lr=1e-12",
                         "federation.rounds=1", "federation.num_clients=1")
    from privlora import client
    from privlora.lora import read_adapter
    from privlora.privacy.mechanisms import seeded_generator
    from privlora.server import local_spec

    fed = prepare(config)
    update = client.local_update(
        fed.handles, read_adapter(fed.handles), fed.clients[0], local_spec(config, fed.plan, 0),
        0, seeded_generator(0, "b"), seeded_generator(0, "n"), fed.tokenizer.pad_token_id)
    values = torch.cat([v.flatten() for v in update.delta.values()])
    assert values.std().item() == pytest.approx(0.5 * 2 * 0.1, rel=0.05)
    assert abs(values.mean().item()) < 0.01


def test_ffa_keeps_a_frozen_and_sends_b_only(tmp_path):
    summary = run(tiny_config("federation.aggregation=ffa", "privacy.mode=local",
                              "privacy.noise_multiplier=1.0"), tmp_path)
    first = load_file(str(tmp_path / "checkpoints/round_001/adapter.safetensors"))
    second = load_file(str(tmp_path / "checkpoints/round_002/adapter.safetensors"))
    a_keys = [k for k in first if k.endswith("lora_A")]
    assert a_keys and all(torch.equal(first[k], second[k]) for k in a_keys)
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith("lora_B"))
    fedavg = run(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1.0"),
                 tmp_path / "fedavg")
    # q_proj and v_proj have B of shapes (32, 4) and (16, 4) vs A (4, 32): B is under half
    assert summary["communication"]["bytes_up_total"] < 0.5 * fedavg["communication"]["bytes_up_total"]


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "exact"])
def test_client_mode_with_every_rule(rule, tmp_path):
    summary = run(tiny_config(f"federation.aggregation={rule}", "privacy.mode=client",
                              "privacy.noise_multiplier=1.0"), tmp_path)
    assert summary["privacy"]["epsilon_spent_pld"] > 0


def test_secure_rng_is_not_reproducible_but_seeded_noise_is(tmp_path):
    def adapter(out, *extra):
        run(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1.0",
                        "federation.rounds=1", *extra), out)
        return load_file(str(out / "adapter/adapter_model.safetensors"))

    seeded = [adapter(tmp_path / f"s{i}") for i in range(2)]
    secure = [adapter(tmp_path / f"c{i}", "privacy.secure_rng=true") for i in range(2)]
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in seeded[0])
    assert not all(torch.equal(secure[0][k], secure[1][k]) for k in secure[0])


@pytest.mark.parametrize("mode", ["sample", "local", "client"])
def test_private_modes_release_nothing_unnoised(mode, tmp_path):
    summary = run(tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=1.0",
                              "federation.rounds=1"), tmp_path)
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["train_loss"] is None  # client losses are data-dependent and not noised
    if mode == "client":  # Poisson participation is what amplification hides
        hidden = ["clients", "bytes_up", "bytes_down", "bytes_up_per_client",
                  "bytes_down_per_client", "bytes_by_client", "ratio_up_vs_full", "seconds"]
        assert all(row[k] is None for k in hidden)
        comm = summary["communication"]
        assert comm["participations_are_expected_values"]
        expected = summary["privacy"]["sample_rate"] * 4 * 1  # q * num_clients * rounds
        assert comm["client_participations"] == pytest.approx(expected)
        # every client has the same rank here, so each transfer is one full adapter's tensors
        fed = prepare(tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=1.0",
                                  "federation.rounds=1"))
        per_client = payload_bytes(flatten(read_adapter(fed.handles)))
        assert per_client > 0
        assert comm["bytes_up_total"] == pytest.approx(per_client * expected)
        assert comm["bytes_down_total"] == comm["bytes_up_total"]
        assert summary["wall_seconds"] is None  # the run's duration grows with participation
    else:
        assert row["bytes_up"] > 0 and row["ratio_up_vs_full"] < 1
    assert "seeded" in summary["privacy"]["noise_source"]


def test_sample_rate_that_gives_huge_batches_is_refused():
    config = tiny_config("privacy.mode=sample", "privacy.noise_multiplier=1.0",
                         "data.partition=dirichlet", "data.dirichlet_alpha=0.05")
    with pytest.raises(ConfigError, match="privacy.sample_rate"):
        make_plan(config, [2, 30, 30, 30])
