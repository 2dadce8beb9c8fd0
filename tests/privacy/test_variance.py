"""The closed-form noise of c (B + beta)(A + alpha), pinned against a Monte-Carlo simulation."""

from __future__ import annotations

import math

import pytest
import torch

from privlora.errors import ConfigError
from privlora.lora import Factors
from privlora.privacy.variance import LayerNoiseVariance, local_noise_variance, summarize
from tests.builders import random_adapter

OUT, IN, RANK = 6, 5, 3
N_CLIENTS, NOISE_STD, SCALE = 4, 0.3, 2.0
DRAWS = 20_000


def _adapter() -> dict[str, Factors]:
    adapter = random_adapter({"layers.0.q_proj": (OUT, IN), "layers.0.v_proj": (2, 7)}, 0, RANK)
    v = adapter["layers.0.v_proj"]
    adapter["layers.0.v_proj"] = Factors(A=v.A * 0.1, B=v.B)  # a layer of smaller A
    return adapter


def _simulate(factors: Factors, noise_a: bool, seed: int) -> torch.Tensor:
    """Return DRAWS samples of c (B + beta)(A + alpha), each noise the mean of N_CLIENTS draws."""
    g = torch.Generator().manual_seed(seed)
    A, B = factors.A.double(), factors.B.double()

    def averaged_noise(shape: tuple[int, ...]) -> torch.Tensor:
        # Each client adds its own N(0, s^2); the server averages them with equal weights.
        per_client = torch.randn(N_CLIENTS, DRAWS, *shape, generator=g, dtype=torch.float64)
        return (per_client * NOISE_STD).mean(dim=0)

    beta = averaged_noise(tuple(B.shape))  # (D, out, r)
    alpha = (
        averaged_noise(tuple(A.shape))
        if noise_a
        else torch.zeros(DRAWS, *A.shape, dtype=torch.float64)
    )
    # (D, out, r) @ (D, r, in) -> (D, out, in)
    return SCALE * (B + beta) @ (A + alpha)


@pytest.mark.parametrize("noise_a", [True, False])
def test_expected_noise_matches_monte_carlo(noise_a):
    adapter = _adapter()
    rows = local_noise_variance(adapter, NOISE_STD, N_CLIENTS, SCALE, noise_a=noise_a)
    assert [row.layer for row in rows] == sorted(adapter)
    for i, row in enumerate(rows):
        factors = adapter[row.layer]
        samples = _simulate(factors, noise_a, seed=100 + i)
        clean = SCALE * factors.B.double() @ factors.A.double()
        sq_frobenius = (samples - clean).pow(2).sum(dim=(1, 2))  # (D,)
        assert row.expected_sq_frobenius == pytest.approx(sq_frobenius.mean().item(), rel=0.03)
        assert row.per_entry_variance == pytest.approx(
            (samples - clean).pow(2).mean().item(), rel=0.03
        )
        assert row.signal_sq_frobenius == pytest.approx(clean.pow(2).sum().item(), rel=1e-9)
        # Unbiased: the Monte-Carlo mean lands within 5 standard errors of c B A everywhere.
        std_error = (samples.var(dim=0) / DRAWS).sqrt()
        assert ((samples.mean(dim=0) - clean).abs() <= 5 * std_error).all()


def test_closed_form_terms():
    adapter = _adapter()
    v = NOISE_STD**2 / N_CLIENTS
    full = {r.layer: r for r in local_noise_variance(adapter, NOISE_STD, N_CLIENTS, SCALE)}
    ffa = {r.layer: r for r in local_noise_variance(adapter, NOISE_STD, N_CLIENTS, SCALE, False)}
    for name, factors in adapter.items():
        r_, in_ = factors.A.shape
        out = factors.B.shape[0]
        a_sq, b_sq = factors.A.pow(2).sum().item(), factors.B.pow(2).sum().item()
        row = full[name]
        assert (row.shape_out, row.shape_in, row.rank) == (out, in_, r_)
        assert row.cross_term == pytest.approx(SCALE**2 * v**2 * r_ * out * in_)
        assert row.expected_sq_frobenius == pytest.approx(
            SCALE**2 * (v * out * a_sq + v * in_ * b_sq + v**2 * r_ * out * in_), rel=1e-6
        )
        assert ffa[name].cross_term == 0.0
        assert ffa[name].expected_sq_frobenius == pytest.approx(SCALE**2 * v * out * a_sq, rel=1e-6)
        assert row.per_entry_variance == pytest.approx(row.expected_sq_frobenius / (out * in_))


def test_more_clients_shrink_the_noise_and_the_cross_term_faster():
    adapter = _adapter()
    one = summarize(local_noise_variance(adapter, NOISE_STD, 1, SCALE))
    many = summarize(local_noise_variance(adapter, NOISE_STD, 10, SCALE))
    assert many["expected_sq_frobenius"] < one["expected_sq_frobenius"] / 9.9
    assert many["cross_term"] == pytest.approx(one["cross_term"] / 100)


def test_summarize_totals():
    rows = local_noise_variance(_adapter(), NOISE_STD, N_CLIENTS, SCALE)
    summary = summarize(rows)
    assert summary["layers"] == 2
    assert summary["expected_sq_frobenius"] == pytest.approx(
        sum(r.expected_sq_frobenius for r in rows)
    )
    assert summary["cross_term"] == pytest.approx(sum(r.cross_term for r in rows))
    assert summary["max_per_entry_variance"] == max(r.per_entry_variance for r in rows)
    assert summary["noise_to_signal"] == pytest.approx(
        summary["expected_sq_frobenius"] / summary["signal_sq_frobenius"]
    )
    assert summarize([])["expected_sq_frobenius"] == 0.0


def test_zero_noise_and_zero_signal():
    adapter = {"w": Factors(A=torch.ones(2, 3), B=torch.zeros(4, 2))}  # B = 0, as at LoRA init
    [row] = local_noise_variance(adapter, 0.0, 3, SCALE)
    assert isinstance(row, LayerNoiseVariance)
    assert row.expected_sq_frobenius == 0.0
    assert summarize([row])["noise_to_signal"] == 0.0
    noisy = summarize(local_noise_variance(adapter, 1.0, 3, SCALE))
    assert noisy["noise_to_signal"] == math.inf


@pytest.mark.parametrize(
    ("std", "clients", "match"),
    [
        (-1.0, 2, "noise_std"),
        (float("nan"), 2, "noise_std"),
        (1.0, 0, "n_clients"),
        (1.0, 2.5, "n_clients"),
    ],
)
def test_rejects_bad_arguments(std, clients, match):
    with pytest.raises(ConfigError, match=match):
        local_noise_variance(_adapter(), std, clients, SCALE)


def test_rejects_mismatched_rank():
    with pytest.raises(ConfigError, match="same r"):
        local_noise_variance({"w": Factors(A=torch.ones(2, 3), B=torch.ones(4, 5))}, 1.0, 1, 1.0)


def test_exact_rule_averages_noisy_products_with_a_larger_cross_term():
    # 'exact' averages each client's own noisy product: (1/n) sum_k (B + beta_k)(A + alpha_k).
    factors = _adapter()["layers.0.q_proj"]
    g = torch.Generator().manual_seed(7)
    A, B = factors.A.double(), factors.B.double()
    beta = torch.randn(N_CLIENTS, DRAWS, OUT, RANK, generator=g, dtype=torch.float64) * NOISE_STD
    alpha = torch.randn(N_CLIENTS, DRAWS, RANK, IN, generator=g, dtype=torch.float64) * NOISE_STD
    # (n, D, out, r) @ (n, D, r, in) -> (n, D, out, in), then the server's mean over clients
    samples = (SCALE * (B + beta) @ (A + alpha)).mean(dim=0)
    empirical = (samples - SCALE * B @ A).pow(2).sum(dim=(1, 2)).mean().item()
    (row,) = local_noise_variance({"q": factors}, NOISE_STD, N_CLIENTS, SCALE,
                                  products_averaged=True)
    assert row.expected_sq_frobenius == pytest.approx(empirical, rel=0.03)
    (factor_avg,) = local_noise_variance({"q": factors}, NOISE_STD, N_CLIENTS, SCALE)
    assert row.cross_term == pytest.approx(N_CLIENTS * factor_avg.cross_term)
