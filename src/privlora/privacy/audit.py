"""Empirical privacy auditing in one training run: a lower bound on epsilon from canary scores.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023). m
canaries are each included in training independently with probability 1/2; after one run the
auditor scores every canary, guesses "included" for the k+ highest scores and "excluded" for
the k- lowest, and abstains on the rest. If the run is (epsilon, delta)-DP, the number of right
guesses among the r made is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to
a delta term (their Theorem 5.2). The largest epsilon that this rejects at the chosen confidence
is the audit's lower bound: an accountant whose epsilon is below it is wrong.

Pure functions over numbers; the canaries and the training run live in ``privlora.audit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import optimize, special, stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Return an upper bound on P[at least ``v`` of ``r`` guesses right] for an (epsilon, delta)-DP
    run with ``m`` canaries (Steinke et al. 2023, Thm. 5.2 and their Algorithm for the p-value):

        beta  = P[Binomial(r, q) >= v],  q = e^eps / (1 + e^eps)
        alpha = max_{1 <= i <= v} P[v > Binomial(r, q) >= v - i] / i
        p     = min(1, beta + alpha * delta * 2m)
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = special.expit(epsilon)
    beta = stats.binom.sf(v - 1, r, q)
    if v == 0:
        return float(min(1.0, beta))
    # P[v > Binomial(r, q) >= v - i] for i = 1..v: running sums of the pmf below v
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return float(min(1.0, beta + alpha * delta * 2 * m))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Return the largest epsilon whose (epsilon, delta)-DP claim ``v`` right of ``r`` guesses
    rejects at ``confidence`` (0 when even epsilon = 0 is not rejected)."""
    significance = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) > significance:
        return 0.0

    def rejected(eps: float) -> float:  # > 0 while the claim is rejected
        return significance - p_value(m, r, v, eps, delta)

    lo, hi = 0.0, 1.0
    while rejected(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # every guess right and no delta term: the bound grows without end
            return math.inf
    return float(optimize.brentq(rejected, lo, hi, xtol=1e-6))


def guesses(scores: Sequence[float], included: Sequence[bool], k_plus: int,
            k_minus: int) -> tuple[int, int]:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest; return
    (guesses made, guesses right). Ties are broken by canary order, which is independent of
    who was included."""
    if k_plus + k_minus > len(scores):
        raise ValueError(f"k+ + k- = {k_plus + k_minus} exceeds the {len(scores)} canaries")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    outs, ins = order[:k_minus], order[len(order) - k_plus:] if k_plus else []
    right = sum(not included[i] for i in outs) + sum(bool(included[i]) for i in ins)
    return k_plus + k_minus, right


# The abstention levels scanned: guess on this share of the canaries, half "in", half "out".
GUESS_SHARES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Bound:
    """The audit's result: the best bound over the scanned guess counts (Bonferroni-corrected)."""

    epsilon: float
    canaries: int
    guesses: int
    correct: int
    confidence: float
    delta: float
    scanned: int  # how many (k+, k-) were tried; each was tested at significance / scanned


def audit_bound(scores: Sequence[float], included: Sequence[bool], delta: float,
                confidence: float = 0.95, shares: Sequence[float] = GUESS_SHARES) -> Bound:
    """Return the largest lower bound over guessing on each share of the canaries (k+ = k- =
    share x m / 2), each tested at (1 - confidence) / len(shares), so that the best of them still
    holds at ``confidence`` (a union bound over the choices made after seeing the scores)."""
    m = len(scores)
    level = 1.0 - (1.0 - confidence) / len(shares)
    best = Bound(0.0, m, 0, 0, confidence, delta, len(shares))
    for share in shares:
        k = max(1, int(share * m) // 2)
        r, v = guesses(scores, included, k, k)
        eps = epsilon_lower_bound(m, r, v, delta, level)
        if eps > best.epsilon or best.guesses == 0:
            best = Bound(eps, m, r, v, confidence, delta, len(shares))
    return best


def gaussian_mu(epsilon: float, delta: float) -> float:
    """Return the mu of the Gaussian mechanism (mu-GDP: shift / noise std) whose privacy curve
    passes through (epsilon, delta) (Balle & Wang 2018, Thm. 8:
    delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2))."""
    def gap(mu: float) -> float:
        return (stats.norm.cdf(-epsilon / mu + mu / 2)
                - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2) - delta)
    return float(optimize.brentq(gap, 1e-6, 100.0))


def ideal_gaussian_bound(epsilon: float, delta: float, m: int, confidence: float = 0.95,
                     shares: Sequence[float] = GUESS_SHARES) -> float:
    """Return the bound ``audit_bound`` would give, in expectation, for a perfect attack on an
    exact Gaussian mechanism of privacy (epsilon, delta) with ``m`` canaries: included scores
    N(mu, 1), excluded N(0, 1), the expected share right among the top and bottom guesses.

    A reference, not a measurement: with m canaries the one-run method certifies about this much
    of an exact Gaussian mechanism at that epsilon (a lucky draw more), far below the epsilon.
    """
    if not math.isfinite(epsilon):
        return math.inf
    mu = gaussian_mu(epsilon, delta)
    level = 1.0 - (1.0 - confidence) / len(shares)
    best = 0.0
    for share in shares:
        k = max(1, int(share * m) // 2)  # guesses on each side, as audit_bound makes them
        # the threshold t above which k of the m / 2 + m / 2 canaries score
        t = optimize.brentq(lambda x, k=k: m / 2 * (stats.norm.sf(x - mu) + stats.norm.sf(x))
                            - k, -50.0, 50.0)
        right = stats.norm.sf(t - mu) / (stats.norm.sf(t - mu) + stats.norm.sf(t))
        best = max(best, epsilon_lower_bound(m, 2 * k, round(2 * k * right), delta, level))
    return best


def roc_auc(scores: Sequence[float], included: Sequence[bool]) -> float:
    """Return P[score of an included canary > score of an excluded one] (ties count 1/2)."""
    ranks = stats.rankdata(scores)
    n_in = sum(bool(x) for x in included)
    n_out = len(scores) - n_in
    if n_in == 0 or n_out == 0:
        return math.nan
    in_rank_sum = sum(rank for rank, x in zip(ranks, included) if x)
    return float((in_rank_sum - n_in * (n_in + 1) / 2) / (n_in * n_out))


def direction_scores(directions: dict[str, torch.Tensor], change: dict[str, torch.Tensor]
                     ) -> torch.Tensor:
    """Return each canary's inner product <change, direction_i>: (m,) in float64."""
    total = torch.zeros(next(iter(directions.values())).shape[0], dtype=torch.float64)
    for name, d in directions.items():
        # (m, n) @ (n,) -> (m,)
        total += d.flatten(1).double() @ change[name].flatten().double()
    return total


@dataclass(frozen=True)
class GradientCanaries:
    """White-box canaries at one site (the construction used to audit DP-SGD): canary i is an
    example whose clipped gradient is the fixed direction ``directions[name][i]``, of joint norm
    exactly the clip, in the space of the trained LoRA tensors. The included ones join each
    DP-SGD step like the site's examples (Poisson, at the same rate); without DP every step.
    They exist only inside ``privlora audit``."""

    directions: dict[str, torch.Tensor]  # wire name -> (m, *shape)
    included: tuple[bool, ...]

    def gradient_sum(self, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the sum of the canaries' gradients whose ids are in ``chosen`` (1-D)."""
        return {name: d[chosen].sum(0) for name, d in self.directions.items()}

    def scores(self, change: dict[str, torch.Tensor]) -> list[float]:
        """Return each canary's score: minus the inner product of ``change`` (the final adapter
        minus the initial one, in the trained tensors) with its direction. Minus, because
        training steps against the gradient: an included canary pulls the adapter along -u."""
        return (-direction_scores(self.directions, change)).tolist()


@dataclass(frozen=True)
class ClientCanaries:
    """Canary clients (client mode): canary i is a client whose update is always the fixed
    direction ``directions[name][i]``, of joint norm above the clip, so that the server's clip is
    on the path (a working clip cuts it to the sensitivity; a missing one would show as a bound
    above the accountant's). The included ones are sampled like the real clients each round."""

    directions: dict[str, torch.Tensor]  # wire name -> (m, *shape)
    included: tuple[bool, ...]

    def updates(self, chosen: list[int]) -> list[dict[str, torch.Tensor]]:
        """Return the updates of the canary clients ``chosen``."""
        return [{name: d[i] for name, d in self.directions.items()} for i in chosen]

    def scores(self, change: dict[str, torch.Tensor]) -> list[float]:
        """Return <change, direction_i>: an included canary client pushes the adapter along it."""
        return direction_scores(self.directions, change).tolist()


@dataclass
class ReleaseCanaries:
    """Canary releases at one site (local mode, where the server sees each release): each round
    the site's own release mechanism (its joint clip and its noise) is also applied to every
    canary's update, +u_i if canary i is included and -u_i if not (``directions`` of joint norm
    above the clip, so that the clipped pair is the sensitivity's worst case, 2 x clip apart),
    and the auditor adds up <release, u_i> over the rounds, as an untrusted server could."""

    directions: dict[str, torch.Tensor]  # wire name -> (m, *shape)
    included: tuple[bool, ...]
    totals: torch.Tensor = None  # type: ignore[assignment]  # (m,) float64, filled by observe

    def __post_init__(self) -> None:
        if self.totals is None:
            self.totals = torch.zeros(len(self.included), dtype=torch.float64)

    def observe(self, release: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                ) -> None:
        """Release every canary's update once through ``release`` and score what came out."""
        for i, inside in enumerate(self.included):
            sign = 1.0 if inside else -1.0
            out = release({name: sign * d[i] for name, d in self.directions.items()})
            self.totals[i] += sum(float(torch.dot(out[name].flatten().double(),
                                                  d[i].flatten().double()))
                                  for name, d in self.directions.items())

    def scores(self) -> list[float]:
        return self.totals.tolist()


def random_directions(shapes: dict[str, torch.Size], m: int, norm: float,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Return ``m`` Gaussian directions over tensors of ``shapes``, each of joint L2 norm
    ``norm`` (so a canary sits exactly on the clip bound)."""
    raw = {name: torch.randn((m, *shape), generator=generator) for name, shape in
           sorted(shapes.items())}
    lengths = sum(t.flatten(1).pow(2).sum(1) for t in raw.values()).sqrt()  # (m,)
    return {name: t * (norm / lengths).view(-1, *[1] * len(t.shape[1:])) for name, t in
            raw.items()}
