"""Aggregation rules inside real federated runs: exact, heterogeneous ranks, diagnostics, bytes."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from privlora import aggregation
from privlora.client import ClientUpdate
from privlora.config import load_config
from privlora.errors import ConfigError, InvalidUpdate
from privlora.lora import flatten, read_adapter
from privlora.server import aggregate_round, check_uplink, downlink, lora_spec, prepare, run

TINY = ["model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=120",
        "data.max_eval=16", "federation.rounds=2", "train.local_steps=2", "train.batch_size=4",
        "train.lr=0.01"]


def tiny_config(*extra):
    return load_config(None, TINY + list(extra))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedavg_logs_its_inexactness(tmp_path):
    run(tiny_config(), tmp_path)
    rows = metrics(tmp_path)
    assert rows[2]["aggregation"] == "fedavg"
    # from round 2 on both factors are non-zero, so mean(B) mean(A) != mean(B A)
    assert rows[2]["factor_gap_max"] > 0


def test_exact_reports_truncation_residual_and_keeps_rank(tmp_path):
    run(tiny_config("federation.aggregation=exact"), tmp_path)
    rows = metrics(tmp_path)
    assert all("svd_residual_max" in r for r in rows[1:])
    # 4 clients of rank 4 sum to rank <= 16 products; truncating to rank 4 loses something
    assert 0 <= rows[2]["svd_residual_max"] < 1
    adapter = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    a = next(v for k, v in adapter.items() if "lora_A" in k)
    assert a.shape[0] == 8  # lora.rank default


def test_heterogeneous_ranks_with_exact(tmp_path):
    summary = run(tiny_config("federation.aggregation=exact", "lora.client_ranks=[2, 8]"),
                  tmp_path)
    assert summary["final"]["loss"] < summary["zero_shot"]["loss"]
    by_client = metrics(tmp_path)[1]["bytes_by_client"]  # ranks cycle: clients 0, 2 have rank 2
    up = {cid: t["up"] for cid, t in by_client.items()}
    assert up["0"] == up["2"] and up["1"] == up["3"]
    assert up["0"] < 0.4 * up["1"]
    assert all(t["up"] == t["down"] for t in by_client.values())


def test_heterogeneous_ranks_bytes_follow_rank(tmp_path):
    run(tiny_config("federation.aggregation=exact", "lora.client_ranks=[2]"), tmp_path / "r2")
    run(tiny_config("federation.aggregation=exact"), tmp_path / "r8")
    small, full = metrics(tmp_path / "r2")[1], metrics(tmp_path / "r8")[1]
    assert small["bytes_up"] < 0.4 * full["bytes_up"]


def test_fedavg_refuses_heterogeneous_ranks():
    with pytest.raises(ConfigError, match="exact"):
        tiny_config("lora.client_ranks=[2, 8]")


def test_exact_under_local_dp(tmp_path):
    summary = run(tiny_config("federation.aggregation=exact", "privacy.mode=local",
                              "privacy.noise_multiplier=2.0"), tmp_path)
    assert summary["privacy"]["epsilon_spent_pld"] > 0
    adapter = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in adapter.values())


def svd_ordered_global(fed, seed=0):
    """A non-trivial global adapter as the server holds it: SVD-ordered factors."""
    gen = torch.Generator().manual_seed(seed)
    spec = lora_spec(fed.config)
    products = {name: torch.randn(f.B.shape[0], f.A.shape[1], generator=gen)
                for name, f in read_adapter(fed.handles).items()}
    return aggregation.refactorize(products, spec.rank, spec.scale)[0]


def zero_update(fed, global_adapter, cid):
    sent = downlink(fed.config, global_adapter, cid)
    return ClientUpdate(cid, {k: torch.zeros_like(v) for k, v in sent.items()}, num_examples=10)


@pytest.mark.parametrize("ranks", ["[2, 8]", "[2]"])
def test_exact_with_mixed_ranks_keeps_what_low_rank_clients_did_not_change(ranks):
    # A rank-2 client that learns nothing must not shrink the global update to its rank-2 share.
    fed = prepare(tiny_config("federation.aggregation=exact", f"lora.client_ranks={ranks}"))
    spec = lora_spec(fed.config)
    global_adapter = svd_ordered_global(fed)
    updates = [zero_update(fed, global_adapter, cid) for cid in range(4)]
    new, residuals = aggregate_round(fed, global_adapter, updates, round_=1)
    before = aggregation.mean_products([global_adapter], [1.0], [spec.scale])
    after = aggregation.mean_products([new], [1.0], [spec.scale])
    for name in before:
        assert torch.allclose(after[name], before[name], atol=1e-4)
    assert max(residuals.values()) < 1e-5


def test_client_mode_exact_clips_each_clients_product_change():
    # No noise: the update is sum_k clip(change_k) / (q N); one client with a huge change moves
    # the global product by exactly clip / (q N) in Frobenius norm over all layers.
    fed = prepare(tiny_config("federation.aggregation=exact", "privacy.mode=client",
                              "privacy.noise_multiplier=1.0", "privacy.clip=0.5"))
    fed = dataclasses.replace(fed, plan=dataclasses.replace(fed.plan, noise_std=0.0))
    spec = lora_spec(fed.config)
    global_adapter = read_adapter(fed.handles)  # B = 0: the global product is zero
    sent = downlink(fed.config, global_adapter, 0)
    big = ClientUpdate(0, {k: torch.full_like(v, 3.0) for k, v in sent.items()}, num_examples=10)
    new, _ = aggregate_round(fed, global_adapter, [big], round_=1)
    moved = aggregation.mean_products([new], [1.0], [spec.scale])
    norm = torch.sqrt(sum(t.double().square().sum() for t in moved.values())).item()
    expected_count = fed.plan.sample_rate * fed.config.federation.num_clients
    assert norm == pytest.approx(0.5 / expected_count, rel=1e-4)


def test_a_client_returning_other_tensors_is_refused():
    fed = prepare(tiny_config("federation.aggregation=ffa"))
    global_adapter = read_adapter(fed.handles)
    sent = downlink(fed.config, global_adapter, 0)
    with_a = ClientUpdate(0, flatten(global_adapter), num_examples=10)  # ffa must send B only
    with pytest.raises(InvalidUpdate, match=r"client 0 .*unexpected \['[^']*lora_A'"):
        check_uplink(with_a, sent)
    check_uplink(zero_update(fed, global_adapter, 0), sent)  # the right tensors pass


@pytest.mark.parametrize("mode", [None, "sample", "client", "local"])
def test_ffa_a_stays_bit_identical_to_its_seeded_init(mode, tmp_path):
    extra = [] if mode is None else [f"privacy.mode={mode}", "privacy.noise_multiplier=1.0"]
    config = tiny_config("federation.aggregation=ffa", *extra)
    initial = flatten(read_adapter(prepare(config).handles))
    run(config, tmp_path)
    for round_ in (1, 2):
        saved = load_file(str(tmp_path / f"checkpoints/round_{round_:03d}/adapter.safetensors"))
        a_keys = [k for k in saved if k.endswith("lora_A")]
        assert a_keys and all(torch.equal(saved[k], initial[k]) for k in a_keys)
        assert any(not torch.equal(saved[k], initial[k]) for k in saved if k.endswith("lora_B"))
