"""One object per aggregation rule: what it trains, how it aggregates, what client DP clips."""

from __future__ import annotations

import pytest
import torch

from privlora import aggregation
from privlora.lora import Factors, first_components, flatten, is_factor_b
from privlora.privacy.central import CentralDP
from privlora.rules import FFA, Exact, FedAvg, WithCentralDP, build_rule
from tests.builders import random_adapter, random_like

SHAPES = {"q": (6, 5), "v": (4, 5)}  # layer: (out, in)
RANK = 4


def no_noise(rule, count: float, clip: float = 0.5) -> WithCentralDP:
    """The rule under client-level DP with the noise switched off (what clipping alone does)."""
    return WithCentralDP(rule, CentralDP(clip=clip, noise_std=0.0, expected_count=count,
                                         secure=False), rng())


def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_build_rule_gives_each_rule_its_behaviour(tiny_config):
    fedavg, ffa = build_rule(tiny_config()), build_rule(tiny_config("federation.aggregation=ffa"))
    exact = build_rule(tiny_config("federation.aggregation=exact", "lora.rank=4"))
    assert (fedavg.trains_a, fedavg.diagnostic, fedavg.averages_products) == (True, "factor_gap",
                                                                              False)
    assert (ffa.trains_a, ffa.diagnostic, ffa.averages_products) == (False, None, False)
    assert exact == Exact(rank=4, scale=16.0 / 4)
    assert (exact.trains_a, exact.diagnostic, exact.averages_products) == (True, "svd_residual",
                                                                           True)


def test_fedavg_averages_each_clients_factors_and_logs_the_gap():
    gen = torch.Generator().manual_seed(1)
    global_adapter = random_adapter(SHAPES, gen, RANK)
    deltas = [random_like(flatten(global_adapter), gen, 0.1) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    out, gaps = FedAvg().aggregate(global_adapter, deltas, weights)
    clients = [aggregation.apply_delta(global_adapter, d) for d in deltas]
    expected = aggregation.fedavg(clients, weights)
    for name in SHAPES:
        assert torch.equal(out[name].A, expected[name].A)
        assert torch.equal(out[name].B, expected[name].B)
    assert gaps == aggregation.factor_product_gap(clients, weights)
    assert all(g > 0 for g in gaps.values())


def test_ffa_averages_b_and_keeps_the_shared_a():
    gen = torch.Generator().manual_seed(2)
    global_adapter = random_adapter(SHAPES, gen, RANK)
    sent = {k: v for k, v in flatten(global_adapter).items() if is_factor_b(k)}
    deltas = [random_like(sent, gen, 0.1) for _ in range(2)]
    out, diagnostics = FFA().aggregate(global_adapter, deltas, [1.0, 3.0])
    assert diagnostics == {}
    for name in SHAPES:
        assert torch.equal(out[name].A, global_adapter[name].A)
        mean_b = 0.25 * deltas[0][f"{name}.lora_B"] + 0.75 * deltas[1][f"{name}.lora_B"]
        torch.testing.assert_close(out[name].B, global_adapter[name].B + mean_b)


def test_exact_with_equal_ranks_is_the_weighted_mean_of_the_clients_products():
    gen = torch.Generator().manual_seed(3)
    rule = Exact(rank=5, scale=0.5)  # rank 5 = min(out, in): nothing is truncated
    global_adapter = random_adapter(SHAPES, gen, rank=5)
    deltas = [random_like(flatten(global_adapter), gen, 0.5) for _ in range(3)]
    weights = [1.0, 1.0, 2.0]
    out, residuals = rule.aggregate(global_adapter, deltas, weights)
    clients = [aggregation.apply_delta(global_adapter, d) for d in deltas]
    target = aggregation.mean_products(clients, weights, [0.5] * 3)
    got = aggregation.mean_products([out], [1.0], [0.5])
    for name in SHAPES:
        torch.testing.assert_close(got[name], target[name], rtol=1e-4, atol=1e-5)
    assert max(residuals.values()) < 1e-5


@pytest.mark.parametrize("ranks", [(2, RANK), (2, 2)])
def test_exact_with_mixed_ranks_keeps_what_low_rank_clients_did_not_change(ranks):
    # A rank-2 client that learns nothing must not shrink the global update to its rank-2 share.
    gen = torch.Generator().manual_seed(4)
    rule = Exact(rank=RANK, scale=2.0)
    products = {name: torch.randn(d_out, d_in, generator=gen)
                for name, (d_out, d_in) in SHAPES.items()}
    global_adapter, _ = aggregation.refactorize(products, RANK, rule.scale)  # SVD-ordered
    deltas = [{k: torch.zeros_like(v) for k, v in
               first_components(flatten(global_adapter), r).items()} for r in ranks]
    new, residuals = rule.aggregate(global_adapter, deltas, [1.0, 1.0])
    before = aggregation.mean_products([global_adapter], [1.0], [rule.scale])
    after = aggregation.mean_products([new], [1.0], [rule.scale])
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-4)
    assert max(residuals.values()) < 1e-5


def test_client_mode_exact_moves_the_product_by_clip_over_qn_for_one_huge_update():
    # No noise: the update is sum_k clip(change_k) / (q N), so one client with a huge change
    # moves the global product by exactly clip / (q N) in Frobenius norm over all layers.
    gen = torch.Generator().manual_seed(5)
    rule = Exact(rank=RANK, scale=2.0)
    global_adapter = {n: Factors(A=f.A, B=torch.zeros_like(f.B))
                      for n, f in random_adapter(SHAPES, gen, RANK).items()}
    big = {k: torch.full_like(v, 3.0) for k, v in flatten(global_adapter).items()}
    new, _ = no_noise(rule, count=4.0).aggregate(global_adapter, [big], [1.0])
    moved = aggregation.mean_products([new], [1.0], [rule.scale])
    norm = torch.sqrt(sum(t.double().square().sum() for t in moved.values())).item()
    assert norm == pytest.approx(0.5 / 4.0, rel=1e-4)


@pytest.mark.parametrize("rule", [FedAvg(), FFA()])
def test_client_mode_factor_rules_move_the_factors_by_clip_over_qn(rule):
    gen = torch.Generator().manual_seed(6)
    global_adapter = random_adapter(SHAPES, gen, RANK)
    sent = {k: v for k, v in flatten(global_adapter).items() if rule.trains_a or is_factor_b(k)}
    big = {k: torch.full_like(v, 3.0) for k, v in sent.items()}
    new, diagnostics = no_noise(rule, count=2.0).aggregate(global_adapter, [big], [1.0])
    assert diagnostics == {}  # a factor gap would be computed from un-noised updates
    moved = {k: flatten(new)[k] - flatten(global_adapter)[k] for k in flatten(new)}
    norm = torch.sqrt(sum(t.double().square().sum() for t in moved.values())).item()
    assert norm == pytest.approx(0.5 / 2.0, rel=1e-4)
    assert all(torch.count_nonzero(moved[k]) == 0 for k in moved if k not in sent)


def test_client_mode_counts_a_nonfinite_update_as_zero():
    gen = torch.Generator().manual_seed(7)
    global_adapter = random_adapter(SHAPES, gen, RANK)
    sent = flatten(global_adapter)
    broken = {k: torch.full_like(v, float("nan")) for k, v in sent.items()}
    new, _ = no_noise(FedAvg(), count=2.0).aggregate(global_adapter, [broken], [1.0])
    for name in SHAPES:
        assert torch.equal(new[name].A, global_adapter[name].A)
        assert torch.equal(new[name].B, global_adapter[name].B)


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "exact"])
def test_only_a_rule_that_mixes_ranks_takes_lower_ranked_clients_in_both_runtimes(tiny_config,
                                                                                   rule):
    """The simulation (lora.client_ranks, checked when the config loads) and a deployment (a
    SuperNode's node-config rank) refuse heterogeneous ranks under the same rules."""
    from privlora.errors import ConfigError
    from privlora.flower.server_app import _checked_rank

    config = tiny_config(f"federation.aggregation={rule}", "lora.rank=4")
    mixes = build_rule(config).mixes_ranks
    assert mixes == (rule == "exact")
    assert _checked_rank(config, 1, 4) == 4  # the full rank is every rule's
    if mixes:
        assert _checked_rank(config, 1, 2) == 2
        tiny_config(f"federation.aggregation={rule}", "lora.rank=4", "lora.client_ranks=[4,2]")
        return
    with pytest.raises(ConfigError, match="exact"):
        _checked_rank(config, 1, 2)
    with pytest.raises(ConfigError, match="exact"):
        tiny_config(f"federation.aggregation={rule}", "lora.rank=4", "lora.client_ranks=[4,2]")
