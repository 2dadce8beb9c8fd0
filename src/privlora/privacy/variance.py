"""Closed-form noise of the LoRA product when clients add local Gaussian noise to A and B.

Local DP on LoRA factors: each of n clients adds N(0, s^2) to every coordinate of A (r, in) and
B (out, r) before sending; the server averages with equal weights, so each averaged coordinate
carries noise of variance v = s^2 / n. With aggregated noise-free factors A, B and LoRA scale c,
the applied update is c (B + beta)(A + alpha). Because alpha and beta are independent, zero-mean
and independent of (A, B):

    E[c (B + beta)(A + alpha)] = c B A                                              (unbiased)
    E||c (beta A + B alpha + beta alpha)||_F^2
        = c^2 [ v out ||A||_F^2 + v in ||B||_F^2 + v^2 r out in ]                   (*)

the three terms coming from beta A, B alpha and the cross term beta alpha (their inner products
vanish in expectation). FFA-LoRA (Sun et al., 2024, "Improving LoRA in Privacy-preserving
Federated Learning", ICLR, Sec. 3) freezes A and noises B only, which leaves c^2 v out ||A||_F^2
and removes the quadratic cross term. (*) is derived here and checked by Monte Carlo in tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from privlora.errors import ConfigError
from privlora.lora import Adapter


@dataclass(frozen=True)
class LayerNoiseVariance:
    """The expected noise that local DP adds to one layer's weight update c B A."""

    layer: str
    shape_out: int
    shape_in: int
    rank: int
    per_entry_variance: float  # expected_sq_frobenius / (out * in): mean over the entries
    expected_sq_frobenius: float  # (*) above: E||noise in c (B + beta)(A + alpha)||_F^2
    cross_term: float  # c^2 v^2 r out in: the part from beta alpha (0 when A is not noised)
    signal_sq_frobenius: float  # ||c B A||_F^2, to set the noise against


def local_noise_variance(
    adapter: Adapter,
    noise_std: float,
    n_clients: int,
    scale: float,
    noise_a: bool = True,
    products_averaged: bool = False,
) -> list[LayerNoiseVariance]:
    """Return, per layer, the expected noise in c (B + beta)(A + alpha) by equation (*).

    ``adapter`` holds the aggregated noise-free factors; ``noise_std`` is s, each client's
    per-coordinate noise; ``noise_a`` False is FFA-LoRA (only B is noised).
    ``products_averaged`` is the 'exact' rule: the server averages each client's own noisy
    product, so the cross term is (1/n) sum_k beta_k alpha_k with variance r s^4 / n per entry
    instead of r (s^2/n)^2 (n times larger); the first-order terms are unchanged.
    """
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"noise_std = {noise_std!r} must be finite and >= 0")
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ConfigError(f"n_clients = {n_clients!r} must be an integer >= 1")
    variance = noise_std**2 / n_clients  # v: per coordinate, after the equal-weight average
    rows = []
    for layer in sorted(adapter):
        factors = adapter[layer]
        rank, shape_in = factors.A.shape
        shape_out, rank_b = factors.B.shape
        if rank_b != rank:
            raise ConfigError(
                f"layer {layer!r}: A is {tuple(factors.A.shape)} but B is "
                f"{tuple(factors.B.shape)}; expected A (r, in) and B (out, r) with the same r"
            )
        a_sq = factors.A.double().pow(2).sum().item()  # ||A||_F^2
        b_sq = factors.B.double().pow(2).sum().item()  # ||B||_F^2
        # (out, r) @ (r, in) -> (out, in)
        signal = (factors.B.double() @ factors.A.double()).pow(2).sum().item() * scale**2
        beta_a = variance * shape_out * a_sq
        if noise_a:
            b_alpha = variance * shape_in * b_sq
            per_client = noise_std**4 / n_clients if products_averaged else variance**2
            cross = per_client * rank * shape_out * shape_in
        else:
            b_alpha, cross = 0.0, 0.0
        total = scale**2 * (beta_a + b_alpha + cross)
        rows.append(
            LayerNoiseVariance(
                layer=layer,
                shape_out=shape_out,
                shape_in=shape_in,
                rank=rank,
                per_entry_variance=total / (shape_out * shape_in),
                expected_sq_frobenius=total,
                cross_term=scale**2 * cross,
                signal_sq_frobenius=signal,
            )
        )
    return rows


def summarize(rows: Sequence[LayerNoiseVariance]) -> dict[str, float]:
    """Total the per-layer noise: sum of E||noise||_F^2, total cross term, max per-entry variance.

    Also report the summed signal ||c B A||_F^2 and the noise-to-signal ratio (inf when the
    signal is zero but the noise is not, e.g. B = 0 at initialization).
    """
    noise = sum(row.expected_sq_frobenius for row in rows)
    signal = sum(row.signal_sq_frobenius for row in rows)
    return {
        "layers": float(len(rows)),
        "expected_sq_frobenius": noise,
        "cross_term": sum(row.cross_term for row in rows),
        "max_per_entry_variance": max((row.per_entry_variance for row in rows), default=0.0),
        "signal_sq_frobenius": signal,
        "noise_to_signal": noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf),
    }
