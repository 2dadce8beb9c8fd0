"""Plan a run's privacy before it starts: sigma (given or calibrated), events, epsilon, refusal.

The plan bounds the worst case (a client taking part in every round), so a run whose plan fits
the budget can never overspend it; a run whose plan does not fit refuses to start.
"""

from __future__ import annotations

from dataclasses import dataclass

import dp_accounting

from privlora.config import RunConfig
from privlora.errors import ConfigError, PrivacyBudgetExceeded
from privlora.privacy import accounting

NEIGHBOURING = {
    "sample": "add/remove one example of one client's data (sensitivity = clip)",
    "client": "add/remove one client with all its data (sensitivity = clip)",
    "local": "replace one client's whole release: any two clipped updates differ by up to "
    "2 x clip (sensitivity = 2 x clip)",
}


SECURE = "os-csprng: noise and privacy sampling drawn from os.urandom"
SEEDED = (
    "seeded: reproducible, so anyone holding the run seed (config.toml) can regenerate the noise "
    "and the sampling; set privacy.secure_rng = true for a deployment"
)


def _check_batch(q: float, largest: int, batch_size: int) -> None:
    """Refuse a sample rate that would give the largest client batches far above batch_size."""
    if q * largest > 4 * batch_size:
        raise ConfigError(
            f"privacy.sample_rate = {q:.4g} gives the largest client ({largest} examples) an "
            f"expected batch of {q * largest:.0f}, over 4 x train.batch_size = {4 * batch_size}; "
            "set privacy.sample_rate explicitly (e.g. train.batch_size / typical client size) "
            "or partition the data more evenly"
        )


@dataclass(frozen=True)
class PrivacyPlan:
    """Everything a privacy mode needs, decided before the first round."""

    mode: str
    neighbouring: str
    noise_multiplier: float
    sample_rate: float  # sample: examples per step; client: clients per round; local: 1
    clip: float
    sensitivity: float
    noise_std: float
    delta: float
    accountant: str
    releases: int  # steps (sample) or rounds (client, local) composed in the worst case
    epsilon_pld: float
    epsilon_rdp: float
    target_epsilon: float | None
    noise_source: str

    def event(self, releases: int | None = None) -> dp_accounting.DpEvent:
        """Return the composed event for ``releases`` (default: the whole planned run)."""
        n = self.releases if releases is None else releases
        return _event(self.mode, self.sample_rate, self.noise_multiplier, n)

    @property
    def epsilon(self) -> float:
        return self.epsilon_pld if self.accountant == "pld" else self.epsilon_rdp


def _event(mode: str, q: float, sigma: float, n: int) -> dp_accounting.DpEvent:
    match mode:
        case "sample":
            return accounting.sample_mode_event(q, sigma, n)
        case "client":
            return accounting.client_mode_event(q, sigma, n)
        case "local":
            return accounting.local_mode_event(sigma, n)
    raise ConfigError(f"privacy.mode = {mode!r} has no events; use sample, client or local")


def make_plan(config: RunConfig, client_sizes: list[int]) -> PrivacyPlan | None:
    """Decide sigma, rates and the worst-case epsilon for ``config``; None when mode = 'none'."""
    p, fed = config.privacy, config.federation
    if p.mode == "none":
        return None
    match p.mode:
        case "sample":
            q = p.sample_rate or min(1.0, config.train.batch_size / min(client_sizes))
            releases = fed.rounds * config.train.local_steps
            accounting.validate_delta(p.delta, max(client_sizes),
                                      "privacy.delta (largest client's examples)")
            _check_batch(q, max(client_sizes), config.train.batch_size)
        case "client":
            q = fed.per_round / fed.num_clients
            releases = fed.rounds
            accounting.validate_delta(p.delta, fed.num_clients, "privacy.delta (clients)")
        case _:
            q, releases = 1.0, fed.rounds
            accounting.validate_delta(p.delta, fed.num_clients, "privacy.delta (clients)")
    sigma = p.noise_multiplier
    if sigma is None:
        sigma, _ = accounting.calibrate_noise_multiplier(
            lambda s: _event(p.mode, q, s, releases), p.target_epsilon, p.delta, p.accountant
        )
    event = _event(p.mode, q, sigma, releases)
    sensitivity = 2 * p.clip if p.mode == "local" else p.clip
    plan = PrivacyPlan(
        mode=p.mode, neighbouring=NEIGHBOURING[p.mode], noise_multiplier=sigma, sample_rate=q,
        clip=p.clip, sensitivity=sensitivity, noise_std=sigma * sensitivity, delta=p.delta,
        accountant=p.accountant, releases=releases,
        epsilon_pld=accounting.epsilon(event, p.delta, "pld"),
        epsilon_rdp=accounting.epsilon(event, p.delta, "rdp"),
        target_epsilon=p.target_epsilon,
        noise_source=SECURE if p.secure_rng else SEEDED,
    )
    if p.target_epsilon is not None and plan.epsilon > p.target_epsilon * (1 + 1e-9):
        raise PrivacyBudgetExceeded(
            f"this run would spend epsilon = {plan.epsilon:.3f} > privacy.target_epsilon = "
            f"{p.target_epsilon} ({p.accountant}); raise privacy.noise_multiplier, lower "
            "federation.rounds or train.local_steps, or drop noise_multiplier to calibrate it"
        )
    return plan
