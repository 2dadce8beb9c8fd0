"""Aggregation rules pinned against hand-computed numbers and a torch.linalg.svd reference."""

from __future__ import annotations

import math

import pytest
import torch

from privlora.aggregation import (
    apply_delta,
    exact,
    factor_product_gap,
    fedavg,
    ffa,
    mean_products,
    normalise_weights,
    product_change,
    refactorize,
    truncate_rank,
    weighted_sum,
)
from privlora.errors import ConfigError, InvalidUpdate
from privlora.lora import Adapter, Factors
from tests.builders import random_adapter

OUT, IN = 6, 5
QV = {"q": (OUT, IN), "v": (OUT, IN)}  # layer: (out, in)
ONE = {"l": (OUT, IN)}


def product(f: Factors) -> torch.Tensor:
    return f.B @ f.A


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref)).item()


def scalar(a: float, b: float) -> Adapter:
    return {"l": Factors(A=torch.tensor([[a]]), B=torch.tensor([[b]]))}


def exact_of(clients, weights, rank, scale=1.0):
    """exact from a zero global adapter, where each client's product change is its product."""
    changes = mean_products(clients, weights, [scale] * len(clients))
    zero = {name: torch.zeros_like(w) for name, w in changes.items()}
    return exact(zero, changes, rank, scale)


# --- weights -------------------------------------------------------------------------------


def test_normalise_weights_sums_to_one():
    assert normalise_weights([3, 1]) == [0.75, 0.25]
    assert normalise_weights([2.0]) == [1.0]


@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [1.0, -2.0], [float("nan")], [float("inf"), 1.0]])
def test_normalise_weights_rejects_bad(bad):
    with pytest.raises(InvalidUpdate, match="weight"):
        normalise_weights(bad)


def test_weights_3_to_1_give_3_to_1_mixture():
    c1, c2 = scalar(1.0, 2.0), scalar(5.0, 6.0)
    avg = fedavg([c1, c2], [3, 1])["l"]
    assert avg.A.item() == pytest.approx(0.75 * 1 + 0.25 * 5)
    assert avg.B.item() == pytest.approx(0.75 * 2 + 0.25 * 6)
    # products 2 and 30: 0.75 * 2 + 0.25 * 30 = 9
    assert mean_products([c1, c2], [30, 10])["l"].item() == pytest.approx(9.0)


def test_weight_count_must_match_clients():
    with pytest.raises(InvalidUpdate, match="one weight per client"):
        fedavg([scalar(1, 1), scalar(2, 2)], [1.0])


# --- fedavg vs mean of products --------------------------------------------------------------


def test_fedavg_gap_hand_computed_1x1():
    # client 1: B A = 1 * 1 = 1; client 2: B A = 3 * 3 = 9; equal weights
    c1, c2 = scalar(1.0, 1.0), scalar(3.0, 3.0)
    avg = fedavg([c1, c2], [1, 1])["l"]
    assert (avg.B @ avg.A).item() == pytest.approx(4.0)  # mean(B) mean(A) = 2 * 2
    assert mean_products([c1, c2], [1, 1])["l"].item() == pytest.approx(5.0)  # (1 + 9) / 2
    assert factor_product_gap([c1, c2], [1, 1])["l"] == pytest.approx(1 / 5)


def test_fedavg_gap_hand_computed_2x2():
    # rank 1, 2x2: client 1 B=e1, A=e1^T -> E11; client 2 B=e2, A=e2^T -> E22
    c1 = {"l": Factors(A=torch.tensor([[1.0, 0.0]]), B=torch.tensor([[1.0], [0.0]]))}
    c2 = {"l": Factors(A=torch.tensor([[0.0, 1.0]]), B=torch.tensor([[0.0], [1.0]]))}
    # mean(B A) = I/2 (norm 1/sqrt2); mean(B) mean(A) = [[.25,.25],[.25,.25]]
    # diff = [[-.25, .25], [.25, -.25]] (norm 1/2) -> gap = (1/2) / (1/sqrt2) = 1/sqrt2
    gap = factor_product_gap([c1, c2], [1, 1])["l"]
    assert gap == pytest.approx(1 / math.sqrt(2))


def test_factor_product_gap_zero_when_mean_product_zero():
    zero = {"l": Factors(A=torch.zeros(2, 3), B=torch.zeros(4, 2))}
    assert factor_product_gap([zero, zero], [1, 1]) == {"l": 0.0}


def test_fedavg_rejects_different_layers():
    with pytest.raises(InvalidUpdate, match="missing"):
        fedavg([scalar(1, 1), {"other": scalar(1, 1)["l"]}], [1, 1])


# --- ffa ---------------------------------------------------------------------------------------


def test_ffa_keeps_A_and_is_exact():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, IN, generator=gen)
    clients = [{"l": Factors(A=A.clone(), B=torch.randn(OUT, 3, generator=gen))} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    out = ffa(clients, weights)["l"]
    assert torch.equal(out.A, A)
    target = mean_products(clients, weights)["l"]
    assert rel_err(out.B @ out.A, target) < 1e-5


def test_ffa_rejects_differing_A():
    gen = torch.Generator().manual_seed(1)
    c1, c2 = random_adapter(QV, gen, 2), random_adapter(QV, gen, 2)
    with pytest.raises(InvalidUpdate, match="same frozen A"):
        ffa([c1, c2], [1, 1])


# --- exact -------------------------------------------------------------------------------------


def test_exact_matches_mean_products_when_low_rank():
    gen = torch.Generator().manual_seed(2)
    r = 2
    U = torch.randn(OUT, r, generator=gen)  # shared column space: every B_k = U M_k
    clients = [
        {"l": Factors(A=torch.randn(r, IN, generator=gen), B=U @ torch.randn(r, r, generator=gen))}
        for _ in range(3)
    ]
    weights = [1.0, 2.0, 3.0]
    target = mean_products(clients, weights)["l"]
    out, residuals = exact_of(clients, weights, rank=r)
    assert out["l"].A.shape == (r, IN) and out["l"].B.shape == (OUT, r)
    assert rel_err(out["l"].B @ out["l"].A, target) < 1e-5
    assert residuals["l"] < 1e-5
    # while averaging the factors is not exact on the same clients
    assert factor_product_gap(clients, weights)["l"] > 1e-2


def test_exact_single_client_and_full_rank_are_exact():
    gen = torch.Generator().manual_seed(3)
    one = random_adapter(QV, gen, 3)
    out, res = exact_of([one], [1.0], rank=3)
    for n in one:
        assert rel_err(product(out[n]), product(one[n])) < 1e-5
        assert res[n] < 1e-5
    many = [random_adapter(QV, gen, 3) for _ in range(4)]
    target = mean_products(many, [1, 1, 1, 1])
    out, res = exact_of(many, [1, 1, 1, 1], rank=min(OUT, IN))
    for n in target:
        assert rel_err(product(out[n]), target[n]) < 1e-5
        assert res[n] < 1e-5


def test_exact_residual_positive_when_rank_too_small():
    gen = torch.Generator().manual_seed(4)
    clients = [random_adapter(QV, gen, 2) for _ in range(3)]  # mean product has rank 5 almost surely
    target = mean_products(clients, [1, 1, 1])["q"]
    out, res = exact_of(clients, [1, 1, 1], rank=2)
    S = torch.linalg.svdvals(target.double())
    expected = (S[2:].square().sum() / S.square().sum()).sqrt().item()
    assert res["q"] == pytest.approx(expected, rel=1e-4)
    assert res["q"] > 0.05
    assert rel_err(product(out["q"]), target) == pytest.approx(expected, rel=1e-3)


def test_refactorize_scale_and_padding():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(3, 4, generator=gen)
    out, res = refactorize({"l": W}, rank=6, scale=2.0)
    A, B = out["l"].A, out["l"].B
    assert A.shape == (6, 4) and B.shape == (3, 6)
    assert torch.count_nonzero(A[3:]) == 0 and torch.count_nonzero(B[:, 3:]) == 0
    assert rel_err(2.0 * B @ A, W) < 1e-5
    assert res == {"l": 0.0}
    zero, res0 = refactorize({"l": torch.zeros(3, 4)}, rank=2)
    assert res0 == {"l": 0.0} and torch.count_nonzero(zero["l"].B @ zero["l"].A) == 0


def test_exact_uses_the_shared_scale():
    gen = torch.Generator().manual_seed(6)
    clients = [random_adapter(QV, gen, 4) for _ in range(2)]
    scale = 0.5
    out, res = exact_of(clients, [1, 3], rank=min(OUT, IN), scale=scale)
    target = mean_products(clients, [1, 3], scales=[scale, scale])
    for n in target:
        assert rel_err(scale * product(out[n]), target[n]) < 1e-5
        assert res[n] < 1e-5


# --- heterogeneous ranks -------------------------------------------------------------------------


def test_heterogeneous_ranks_zero_padded_and_true_shapes():
    gen = torch.Generator().manual_seed(7)
    small, big = random_adapter(QV, gen, 2), random_adapter(QV, gen, 4)
    padded = truncate_rank(
        {
            n: Factors(
                A=torch.cat([f.A, torch.randn(2, IN, generator=gen)]),
                B=torch.cat([f.B, torch.randn(OUT, 2, generator=gen)], dim=1),
            )
            for n, f in small.items()
        },
        2,
    )  # rank-4 tensors whose components 3..4 are zero: same product as `small`
    target = {n: 0.25 * product(small[n]) + 0.75 * product(big[n]) for n in small}
    for clients in ([small, big], [padded, big]):
        out, res = exact_of(clients, [1, 3], rank=min(OUT, IN))
        for n, t in target.items():
            assert out[n].A.shape == (min(OUT, IN), IN)
            assert rel_err(product(out[n]), t) < 1e-5
            assert res[n] < 1e-5
    # zero-padded clients share shapes, so fedavg runs; true rank 2 vs 4 it refuses
    fedavg([padded, big], [1, 3])
    with pytest.raises(InvalidUpdate, match=r"r=2 vs r=4.*'exact'"):
        fedavg([small, big], [1, 3])


def test_exact_rejects_mismatched_update_shapes():
    bad = {"l": Factors(A=torch.randn(2, IN + 1), B=torch.randn(OUT, 2))}
    with pytest.raises(InvalidUpdate, match="differs from client 0"):
        exact_of([random_adapter(ONE, torch.Generator().manual_seed(8), 2), bad], [1, 1], 2)


def test_non_finite_update_rejected():
    bad = {"l": Factors(A=torch.tensor([[float("nan")]]), B=torch.tensor([[1.0]]))}
    with pytest.raises(InvalidUpdate, match="NaN"):
        exact_of([scalar(1, 1), bad], [1, 1], rank=1)


# --- truncate_rank -------------------------------------------------------------------------------


def test_truncate_rank_zeros_trailing_components_only():
    gen = torch.Generator().manual_seed(9)
    ad = random_adapter(QV, gen, 4)
    out = truncate_rank(ad, 2)
    for n, f in ad.items():
        assert out[n].A.shape == f.A.shape and out[n].B.shape == f.B.shape
        assert torch.equal(out[n].A[:2], f.A[:2]) and torch.equal(out[n].B[:, :2], f.B[:, :2])
        assert torch.count_nonzero(out[n].A[2:]) == 0 and torch.count_nonzero(out[n].B[:, 2:]) == 0
    same = truncate_rank(ad, 8)
    assert all(torch.equal(same[n].A, ad[n].A) and torch.equal(same[n].B, ad[n].B) for n in ad)
    assert same["q"].A is not ad["q"].A


def test_truncate_svd_ordered_is_best_rank_k():
    gen = torch.Generator().manual_seed(10)
    W = torch.randn(OUT, IN, generator=gen)
    full, _ = refactorize({"l": W}, rank=min(OUT, IN))
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    for k in (1, 2, 3):
        share = truncate_rank(full, k)["l"]
        reference = (U[:, :k] * S[:k]) @ Vh[:k]
        assert rel_err(product(share).double(), reference) < 1e-5


# --- purity and dispatch -------------------------------------------------------------------------


def test_inputs_not_mutated():
    gen = torch.Generator().manual_seed(11)
    A = torch.randn(3, IN, generator=gen)
    clients = [{"l": Factors(A=A.clone(), B=torch.randn(OUT, 3, generator=gen))} for _ in range(2)]
    snapshot = [{n: (f.A.clone(), f.B.clone()) for n, f in c.items()} for c in clients]
    weights = [2.0, 1.0]
    for aggregate in (fedavg, ffa, lambda c, w: exact_of(c, w, rank=2)[0]):
        out = aggregate(clients, weights)
        out["l"].A.add_(1.0)  # mutating the result must not reach the clients
    apply_delta(clients[0], {"l.lora_B": torch.ones(OUT, 3)})
    truncate_rank(clients[0], 1)
    assert weights == [2.0, 1.0]
    for c, snap in zip(clients, snapshot):
        assert all(torch.equal(c[n].A, snap[n][0]) and torch.equal(c[n].B, snap[n][1]) for n in c)


def test_bad_rank_is_config_error():
    with pytest.raises(ConfigError, match="lora.rank"):
        exact_of([scalar(1, 1)], [1], rank=0)


def test_exact_refuses_a_change_for_other_layers():
    with pytest.raises(InvalidUpdate, match="layers"):
        exact({"q": torch.zeros(OUT, IN)}, {"v": torch.zeros(OUT, IN)}, rank=2, scale=1.0)


# --- apply_delta -------------------------------------------------------------------------------


def test_apply_delta_adds_factors_and_keeps_what_is_not_sent():
    gen = torch.Generator().manual_seed(12)
    start = random_adapter(ONE, gen, 3)
    dA, dB = torch.randn(3, IN, generator=gen), torch.randn(OUT, 3, generator=gen)
    both = apply_delta(start, {"l.lora_A": dA, "l.lora_B": dB})["l"]
    assert torch.equal(both.A, start["l"].A + dA) and torch.equal(both.B, start["l"].B + dB)
    b_only = apply_delta(start, {"l.lora_B": dB})["l"]  # FFA: A is kept as it was
    assert torch.equal(b_only.A, start["l"].A) and torch.equal(b_only.B, start["l"].B + dB)


def test_apply_delta_of_a_rank_r_client_zeroes_the_components_it_never_had():
    gen = torch.Generator().manual_seed(13)
    start = random_adapter(ONE, gen, 4)
    dA, dB = torch.randn(2, IN, generator=gen), torch.randn(OUT, 2, generator=gen)
    out = apply_delta(start, {"l.lora_A": dA, "l.lora_B": dB})["l"]
    assert torch.equal(out.A[:2], start["l"].A[:2] + dA) and torch.count_nonzero(out.A[2:]) == 0
    assert torch.equal(out.B[:, :2], start["l"].B[:, :2] + dB)
    assert torch.count_nonzero(out.B[:, 2:]) == 0


# --- product changes (exact with mixed ranks, and client-mode exact) -------------------------


def test_product_change_is_scaled_difference_of_products():
    gen = torch.Generator().manual_seed(7)
    start, end = random_adapter(QV, gen, 3), random_adapter(QV, gen, 3)
    change = product_change(start, end, scale=2.0)
    for name in start:
        expected = 2.0 * (product(end[name]) - product(start[name]))
        assert torch.allclose(change[name], expected, atol=1e-5)


def test_weighted_sum_streams_a_generator_and_matches_hand_sum():
    updates = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, -1.0])}]
    total = weighted_sum((u for u in updates), [0.25, 0.75])
    assert torch.equal(total["x"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75]))


@pytest.mark.parametrize("updates", [[], [{"x": torch.ones(2)}, {"y": torch.ones(2)}]])
def test_weighted_sum_rejects_empty_or_mismatched(updates):
    with pytest.raises(InvalidUpdate):
        weighted_sum(updates, [1.0] * len(updates))
