"""Privacy accounting: DpEvents per mode -> epsilon; calibrate sigma from a target epsilon.

A thin layer over Google's dp-accounting. Every privacy-relevant step is an immutable
`dp_accounting.DpEvent`; the library's PLD accountant (the headline number) and RDP accountant
(a looser bound reported beside it) turn a composition of events into epsilon at a given delta.
No privacy formula is written here.

All functions are pure; `privlora.privacy.ledger` records which events each party spent.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from privlora import quiet
from privlora.errors import ConfigError

quiet.quiet_dp_accounting()

Accountant = Literal["pld", "rdp"]
DpEvent = dp_accounting.DpEvent

# RDP orders: from near 1 (the optimum for epsilon in the tens) through integers to 63, then
# sparse up to 4096 (the optimum for epsilon ~ 0.01). dp-accounting ignores orders <= 1.01 when
# converting to (epsilon, delta), so the grid starts at 1.02; fractional orders below 2 are slow
# to evaluate for small sigma, so they are spaced 0.05 apart.
_SPARSE_ORDERS = [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024, 2048, 4096]
RDP_ORDERS: tuple[float, ...] = tuple(
    [1.02, *(1 + x / 20 for x in range(1, 20)), *(2 + x / 10 for x in range(100))]
    + [float(a) for a in [*range(12, 64), *_SPARSE_ORDERS]]
)

# PLD discretization: the interval is refined until it is at most epsilon / _PLD_MIN_RESOLUTION
# (measured: relative error < 1% at 1000, < 0.3% at 2000, versus a 20000x-finer reference).
_PLD_MAX_INTERVAL = 1e-3
_PLD_MIN_INTERVAL = 1e-7
_PLD_MIN_RESOLUTION = 1000.0
_PLD_TARGET_RESOLUTION = 2000.0

# Calibration searches sigma in [SIGMA_MIN, _SIGMA_MAX] and accepts [0.98, 1] x target.
SIGMA_MIN = 2.0**-4  # public: the plan report uses it
_SIGMA_MAX = 2.0**20
_CALIBRATION_TOLERANCE = 0.98


def validate_sample_rate(q: float, field: str = "privacy.sample_rate") -> None:
    """Raise ConfigError unless the Poisson sampling rate `q` lies in (0, 1]."""
    if not (isinstance(q, numbers.Real) and 0.0 < q <= 1.0):
        raise ConfigError(
            f"{field} = {q!r} must be in (0, 1]: it is the probability that one record (or "
            "client) is included in a step; e.g. batch_size / dataset_size"
        )


def validate_noise_multiplier(sigma: float, field: str = "privacy.noise_multiplier") -> None:
    """Raise ConfigError unless the noise multiplier is finite and >= 0 (0 means no privacy)."""
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma >= 0.0):
        raise ConfigError(
            f"{field} = {sigma!r} must be a finite number >= 0 (noise std / L2 sensitivity); "
            "e.g. 1.0, or set privacy.target_epsilon to calibrate it"
        )


def validate_delta(delta: float, population: int, field: str = "privacy.delta") -> None:
    """Raise ConfigError unless 0 < delta < 1 / population.

    A delta of 1/population or more permits a mechanism that publishes one person's record
    outright, so the guarantee would be void (Dwork & Roth 2014, section 2.3).
    """
    if (
        isinstance(population, bool)
        or not isinstance(population, numbers.Integral)
        or population < 1
    ):
        raise ConfigError(f"population = {population!r} must be an integer >= 1 (records/clients)")
    bound = 1.0 / population
    if not (isinstance(delta, numbers.Real) and 0.0 < delta < bound):
        raise ConfigError(
            f"{field} = {delta!r} must be in (0, 1/population) = (0, {bound:.3g}) for a "
            f"population of {population}; use e.g. delta < 1/population such as {bound / 10:.1g}"
        )


def _validate_count(n: int, field: str) -> None:
    """Raise ConfigError unless `n` is an integer >= 0."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ConfigError(f"{field} = {n!r} must be an integer >= 0")


def validate_probability(p: float, field: str) -> None:
    """Raise ConfigError unless 0 < p < 1 (used for delta where no population is known)."""
    if not (isinstance(p, numbers.Real) and 0.0 < p < 1.0):
        raise ConfigError(f"{field} = {p!r} must be in (0, 1), e.g. 1e-5")


def _repeat(event: DpEvent, count: int) -> DpEvent:
    """Return `count` self-compositions of `event`, or a NoOpDpEvent when count is 0."""
    if count == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(event=event, count=int(count))


def _poisson_gaussian(q: float, sigma: float) -> DpEvent:
    """Return one Poisson-sampled Gaussian event (inputs already validated)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier=float(sigma))
    return dp_accounting.PoissonSampledDpEvent(sampling_probability=float(q), event=gaussian)


def sample_mode_event(sample_rate: float, noise_multiplier: float, steps: int) -> DpEvent:
    """Return the DpEvent of `steps` DP-SGD steps: Poisson-sampled Gaussian, self-composed.

    Abadi et al. 2016 (DP-SGD): each step samples every example with probability q, clips each
    per-example gradient to norm C and adds N(0, (sigma C)^2) noise to the sum.
    """
    validate_sample_rate(sample_rate, "privacy.sample_rate")
    validate_noise_multiplier(noise_multiplier, "privacy.noise_multiplier")
    _validate_count(steps, "steps")
    return _repeat(_poisson_gaussian(sample_rate, noise_multiplier), steps)


def client_mode_event(sample_rate: float, noise_multiplier: float, rounds: int) -> DpEvent:
    """Return the DpEvent of `rounds` DP-FedAvg rounds with Poisson client sampling.

    McMahan et al. 2018 (DP-FedAvg): each round samples every client with probability q, clips
    each client update to norm C and adds N(0, (sigma C)^2) noise to the sum. The accounting is
    that of DP-SGD with clients in place of examples.
    """
    validate_sample_rate(sample_rate, "client sample rate (clients per round / federation.num_clients)")
    validate_noise_multiplier(noise_multiplier, "privacy.noise_multiplier")
    _validate_count(rounds, "federation.rounds")
    return _repeat(_poisson_gaussian(sample_rate, noise_multiplier), rounds)


def local_mode_event(noise_multiplier: float, releases: int) -> DpEvent:
    """Return the DpEvent of `releases` Gaussian releases with no sampling amplification.

    Local DP: a client noises its own clipped update before it leaves, so nobody can rely on
    the server's sampling; sigma is noise std / L2 sensitivity.
    """
    validate_noise_multiplier(noise_multiplier, "privacy.noise_multiplier")
    _validate_count(releases, "releases")
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier=float(noise_multiplier))
    return _repeat(gaussian, releases)


def compose(events: Sequence[DpEvent]) -> DpEvent:
    """Return one DpEvent composing `events`, grouping equal events into self-compositions.

    Grouping is exact (composition is commutative) and lets PLD self-compose by FFT once per
    distinct event instead of convolving every record.
    """
    groups: list[tuple[DpEvent, int]] = []
    for event in events:
        if isinstance(event, dp_accounting.NoOpDpEvent):
            continue
        for i, (seen, count) in enumerate(groups):
            if seen == event:
                groups[i] = (seen, count + 1)
                break
        else:
            groups.append((event, 1))
    parts = [
        e if n == 1 else dp_accounting.SelfComposedDpEvent(event=e, count=n) for e, n in groups
    ]
    if not parts:
        return dp_accounting.NoOpDpEvent()
    return parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(events=parts)


def _pld_epsilon_at(event: DpEvent, delta: float, interval: float) -> float:
    """Return the PLD (pessimistic, i.e. upper-bound) epsilon at one discretization interval."""
    accountant = PLDAccountant(value_discretization_interval=interval)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def _pld_epsilon(event: DpEvent, delta: float) -> float:
    """Return the PLD epsilon, refining the discretization until it is fine next to epsilon.

    A fixed interval is either slow for large epsilon or inaccurate for small epsilon (1e-3
    overstates epsilon = 0.03 by > 50%), so the interval follows the current estimate: each
    pass is an upper bound, and a pass is accepted once interval <= epsilon / 1000.
    """
    interval = _PLD_MAX_INTERVAL
    while True:
        eps = _pld_epsilon_at(event, delta, interval)
        done = not math.isfinite(eps) or eps <= 0.0 or interval <= _PLD_MIN_INTERVAL
        if done or interval <= eps / _PLD_MIN_RESOLUTION:
            return eps
        interval = max(eps / _PLD_TARGET_RESOLUTION, _PLD_MIN_INTERVAL)


def _rdp_epsilon(event: DpEvent, delta: float) -> float:
    """Return the RDP epsilon over a wide order grid (Mironov 2017; conversion of Balle+ 2020)."""
    accountant = RdpAccountant(orders=RDP_ORDERS)
    accountant.compose(event)
    eps = float(accountant.get_epsilon(delta))
    return math.inf if math.isnan(eps) else eps


def epsilon(event: DpEvent, delta: float, accountant: Accountant = "pld") -> float:
    """Return the epsilon that `event` spends at `delta` (math.inf for sigma = 0, 0.0 for no-op).

    "pld": privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), a
    near-exact upper bound. "rdp": Renyi DP (Mironov 2017), a looser but classic bound.
    Raises dp_accounting.UnsupportedEventError for events the library cannot account.
    """
    if not isinstance(event, DpEvent):
        raise TypeError(f"event = {event!r} must be a dp_accounting.DpEvent")
    validate_probability(delta, "privacy.delta")
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return 0.0
    match accountant:
        case "pld":
            return _pld_epsilon(event, delta)
        case "rdp":
            return _rdp_epsilon(event, delta)
        case _:
            raise ConfigError(f"privacy.accountant = {accountant!r} is unknown; use 'pld' or 'rdp'")


def calibrate_noise_multiplier(
    make_event: Callable[[float], DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: Accountant = "pld",
) -> tuple[float, float]:
    """Return (sigma, achieved epsilon) with 0.98 * target <= achieved <= target.

    Epsilon falls as sigma grows, so: bracket sigma by doubling (or halving) from 1, then
    bisect in log(sigma). Raises ConfigError naming privacy.target_epsilon when no sigma in
    [2^-4, 2^20] lands in the window.
    """
    if not (isinstance(target_epsilon, numbers.Real) and 0.0 < target_epsilon < math.inf):
        raise ConfigError(
            f"privacy.target_epsilon = {target_epsilon!r} is unreachable: it must be a finite "
            "number > 0, e.g. 8.0"
        )
    validate_probability(delta, "privacy.delta")

    def eps_at(sigma: float) -> float:
        return epsilon(make_event(sigma), delta, accountant)

    lo, hi, eps_hi = _bracket_sigma(eps_at, target_epsilon)
    while eps_hi < _CALIBRATION_TOLERANCE * target_epsilon and hi / lo > 1.0 + 1e-9:
        mid = math.sqrt(lo * hi)
        eps_mid = eps_at(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi, eps_hi


def _bracket_sigma(eps_at: Callable[[float], float], target: float) -> tuple[float, float, float]:
    """Return (lo, hi, eps(hi)) with eps(lo) > target >= eps(hi) and hi = 2 lo, or raise."""
    sigma, eps = 1.0, eps_at(1.0)
    if eps > target:  # too little noise: double until the target is met
        while eps > target:
            if sigma >= _SIGMA_MAX:
                raise ConfigError(
                    f"privacy.target_epsilon = {target!r} is unreachable: even noise multiplier "
                    f"{sigma:g} spends epsilon {eps:.4g}; raise the target, privacy.delta, or "
                    "reduce the number of steps/rounds or the sample rate"
                )
            sigma, eps = 2.0 * sigma, eps_at(2.0 * sigma)
        return sigma / 2.0, sigma, eps
    prev_eps = eps
    while eps <= target:  # more noise than needed: halve until the target is exceeded
        if eps >= _CALIBRATION_TOLERANCE * target:
            return sigma / 2.0, sigma, eps
        if sigma <= SIGMA_MIN:
            raise ConfigError(
                f"privacy.target_epsilon = {target!r} is unreachable from below: even noise "
                f"multiplier {sigma:g} spends only epsilon {eps:.4g}, so the events barely "
                "depend on sigma (zero steps?) or the target is too loose to protect anyone; "
                "set privacy.noise_multiplier directly or lower the target"
            )
        prev_eps, sigma, eps = eps, sigma / 2.0, eps_at(sigma / 2.0)
    return sigma, 2.0 * sigma, prev_eps
