"""Plan a run's privacy before it starts: one object per mode, carrying that mode's behaviour.

``make_plan`` reads ``privacy.mode`` once and builds ``NoPrivacy``, ``SampleLevel``,
``ClientLevel`` or ``LocalLevel``. Each says where the Gaussian mechanism sits (the client's
mechanism, the server's), how clients are chosen, which per-round fields it hides, and which
DpEvents a round spends: ``round_events`` is the one function behind the budget forecast, the
per-round budget check and the ledger's record. The forecast bounds the worst case (a client
in every round), so a run whose plan fits the budget cannot overspend it; one that does not
fit refuses to start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Protocol

import dp_accounting
import torch

from privlora.config import FederationConfig, RunConfig
from privlora.errors import ConfigError, PrivacyBudgetExceeded
from privlora.privacy import accounting
from privlora.privacy.central import CentralDP
from privlora.privacy.client_dp import LocalDP, SampleDP
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.mechanisms import uniform
from privlora.privacy.signal import NoiseToSignal, noise_norm_over_clip, noise_to_signal

SECURE = "os-csprng: DP noise and privacy sampling drawn from os.urandom"
SEEDED = (
    "seeded (privacy.reproducible_noise = true): DP noise and privacy sampling are "
    "generated from the run seed, so this epsilon does NOT hold against anyone who knows or "
    "guesses the seed; for research only"
)
GLOBAL = "global"

# Fields of a round's metrics line that depend on which clients took part or on how much work
# the realised (Poisson) batches took. Every private mode hides timing and the training loss.
_TIMING = frozenset({"seconds", "train_loss"})
_PARTICIPATION = frozenset({"clients", "bytes_up", "bytes_down", "bytes_up_per_client",
                            "bytes_down_per_client", "bytes_by_client", "ratio_up_vs_full",
                            "rejected"})


def party(client_id: int) -> str:
    """Return the ledger party of one client."""
    return f"client-{client_id}"


def fixed_selection(num_clients: int, per_round: int, rng: torch.Generator) -> list[int]:
    """Choose ``per_round`` clients uniformly (all when per_round = num_clients), seeded."""
    if per_round == num_clients:
        return list(range(num_clients))
    return sorted(torch.randperm(num_clients, generator=rng)[:per_round].tolist())


class PrivacyPlan(Protocol):
    """What the protocol and the records ask of a plan, in every mode."""

    private: bool
    hides_participation: bool
    target_epsilon: float | None
    accountant: accounting.Accountant
    noise_source: str | None
    reproducible: bool  # every draw seeded by the run: a repeated round releases the same

    def select_clients(self, num_clients: int, per_round: int,
                       rng: torch.Generator) -> list[int]: ...
    def expected_participants(self, num_clients: int, per_round: int) -> float: ...
    def round_events(self, participants: Iterable[int]) -> dict[str, dp_accounting.DpEvent]: ...
    def training_mechanism(self) -> SampleDP | None: ...
    def release_mechanism(self) -> LocalDP | None: ...
    def central_mechanism(self) -> CentralDP | None: ...
    def new_ledger(self) -> PrivacyLedger | None: ...
    def redact(self, row: dict[str, Any]) -> dict[str, Any]: ...
    def to_dict(self) -> dict[str, Any] | None: ...
    def noise_to_signal(self, coordinates: int,
                        participants: float) -> NoiseToSignal | None: ...


@dataclass(frozen=True)
class NoPrivacy:
    """privacy.mode = 'none': no mechanism, no events, nothing hidden."""

    private: ClassVar[bool] = False
    hides_participation: ClassVar[bool] = False
    target_epsilon: ClassVar[None] = None
    accountant: ClassVar[str] = "pld"
    noise_source: ClassVar[None] = None
    reproducible: ClassVar[bool] = True

    def select_clients(self, num_clients: int, per_round: int,
                       rng: torch.Generator) -> list[int]:
        return fixed_selection(num_clients, per_round, rng)

    def expected_participants(self, num_clients: int, per_round: int) -> float:
        return float(per_round)

    def round_events(self, participants: Iterable[int]) -> dict[str, dp_accounting.DpEvent]:
        return {}

    def training_mechanism(self) -> None:
        return None

    def release_mechanism(self) -> None:
        return None

    def central_mechanism(self) -> None:
        return None

    def new_ledger(self) -> None:
        return None

    def redact(self, row: dict[str, Any]) -> dict[str, Any]:
        return dict(row)

    def noise_to_signal(self, coordinates: int, participants: float) -> None:
        return None

    def to_dict(self) -> None:
        return None


@dataclass(frozen=True)
class _Private:
    """The numbers every private mode shares; subclasses add where the noise goes."""

    noise_multiplier: float
    clip: float
    delta: float
    accountant: accounting.Accountant
    target_epsilon: float | None
    reproducible_noise: bool
    rounds: int
    num_clients: int

    # Each mode also has ``sample_rate`` (a field, or 1.0 where nothing is sampled). It is not
    # declared here: a dataclass field after an inherited default would need a default too.
    mode: ClassVar[str]
    neighbouring: ClassVar[str]
    private: ClassVar[bool] = True
    hides_participation: ClassVar[bool] = False
    hidden: ClassVar[frozenset[str]] = _TIMING

    def round_events(self, participants: Iterable[int]) -> dict[str, dp_accounting.DpEvent]:
        raise NotImplementedError

    @property
    def releases(self) -> int:
        """How many mechanism releases one party's worst case composes."""
        return self.rounds

    @property
    def sensitivity(self) -> float:
        return self.clip

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.sensitivity

    @property
    def secure(self) -> bool:
        return not self.reproducible_noise

    @property
    def reproducible(self) -> bool:
        return self.reproducible_noise

    @property
    def noise_source(self) -> str:
        return SEEDED if self.reproducible_noise else SECURE

    def select_clients(self, num_clients: int, per_round: int,
                       rng: torch.Generator) -> list[int]:
        return fixed_selection(num_clients, per_round, rng)

    def expected_participants(self, num_clients: int, per_round: int) -> float:
        """Clients per round on average (exact where the count is fixed)."""
        return float(per_round)

    def training_mechanism(self) -> SampleDP | None:
        """DP-SGD inside the client's local steps (sample mode)."""
        return None

    def release_mechanism(self) -> LocalDP | None:
        """Clip and noise on the client's update before it leaves (local mode)."""
        return None

    def central_mechanism(self) -> CentralDP | None:
        """Clip per update and noise on the sum, at the server (client mode)."""
        return None

    def new_ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.delta, self.neighbouring, self.noise_source)

    def redact(self, row: dict[str, Any]) -> dict[str, Any]:
        """Return ``row`` with this mode's hidden fields set to None."""
        return {k: None if k in self.hidden else v for k, v in row.items()}

    def noise_to_signal(self, coordinates: int, participants: float) -> NoiseToSignal:
        """Predict whether the released noise lets the run learn (``privacy.signal``)."""
        raise NotImplementedError

    def forecast(self) -> dp_accounting.DpEvent:
        """Return the worst party's composed events if it takes part in every round."""
        distinct: list[dp_accounting.DpEvent] = []
        for event in self.round_events(range(self.num_clients)).values():
            if event not in distinct:
                distinct.append(event)
        composed = [accounting.compose([e] * self.rounds) for e in distinct]
        if len(composed) == 1:
            return composed[0]
        return max(composed, key=lambda e: accounting.epsilon(e, self.delta, self.accountant))

    @cached_property
    def epsilon_pld(self) -> float:
        return accounting.epsilon(self.forecast(), self.delta, "pld")

    @cached_property
    def epsilon_rdp(self) -> float:
        return accounting.epsilon(self.forecast(), self.delta, "rdp")

    @property
    def epsilon(self) -> float:
        """The planned worst-case epsilon under the configured accountant."""
        return self.epsilon_pld if self.accountant == "pld" else self.epsilon_rdp

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "neighbouring": self.neighbouring,
                **dataclasses.asdict(self), "sample_rate": self.sample_rate,  # type: ignore[attr-defined]
                "releases": self.releases, "sensitivity": self.sensitivity, "noise_std": self.noise_std,
                "epsilon_pld": self.epsilon_pld, "epsilon_rdp": self.epsilon_rdp,
                "epsilon_planned": self.epsilon, "noise_source": self.noise_source}


@dataclass(frozen=True)
class SampleLevel(_Private):
    """DP-SGD inside each client; each example is a protected unit (DP-LoRA done right)."""

    sample_rate: float  # Poisson rate of examples per step: configured, never from data sizes
    steps_per_round: int
    divisor: float  # train.batch_size: the fixed denominator of the noisy gradient

    mode: ClassVar[str] = "sample"
    neighbouring: ClassVar[str] = (
        "add/remove one example of one client's data (sensitivity = clip); the sample rate and "
        "the gradient divisor (train.batch_size) are fixed by the configuration, so nothing "
        "released depends on a client's example count"
    )

    @property
    def releases(self) -> int:
        return self.rounds * self.steps_per_round

    def round_events(self, participants: Iterable[int]) -> dict[str, dp_accounting.DpEvent]:
        event = accounting.sample_mode_event(self.sample_rate, self.noise_multiplier,
                                             self.steps_per_round)
        return {party(i): event for i in participants}

    def noise_to_signal(self, coordinates: int, participants: float) -> NoiseToSignal:
        # one DP-SGD step at one client; steps and clients average into the adapter
        per_step = noise_norm_over_clip(self.noise_multiplier, coordinates) / self.divisor
        return noise_to_signal(
            "one DP-SGD step at one client", per_step, self.releases * participants, coordinates,
            "examples per step (train.batch_size, with privacy.sample_rate to match)",
            "steps x rounds x clients per round")

    def training_mechanism(self) -> SampleDP:
        return SampleDP(self.clip, self.noise_multiplier, self.sample_rate, self.divisor,
                        self.secure)


@dataclass(frozen=True)
class ClientLevel(_Private):
    """DP-FedAvg with a trusted server: Poisson client sampling, clip per client, noise on sum."""

    sample_rate: float  # Poisson rate of clients per round

    mode: ClassVar[str] = "client"
    neighbouring: ClassVar[str] = "add/remove one client with all its data (sensitivity = clip)"
    hides_participation: ClassVar[bool] = True
    hidden: ClassVar[frozenset[str]] = _TIMING | _PARTICIPATION

    def select_clients(self, num_clients: int, per_round: int,
                       rng: torch.Generator) -> list[int]:
        # Poisson sampling at rate q, as the accountant's amplification by sampling assumes.
        draws = uniform(num_clients, rng, secure=self.secure)
        return (draws < self.sample_rate).nonzero()[:, 0].tolist()

    def expected_participants(self, num_clients: int, per_round: int) -> float:
        return self.sample_rate * num_clients

    def round_events(self, participants: Iterable[int]) -> dict[str, dp_accounting.DpEvent]:
        return {GLOBAL: accounting.client_mode_event(self.sample_rate, self.noise_multiplier, 1)}

    def noise_to_signal(self, coordinates: int, participants: float) -> NoiseToSignal:
        # one round's noised mean over the expected participants
        per_round = noise_norm_over_clip(self.noise_multiplier, coordinates) / participants
        return noise_to_signal(
            "one round's noised mean", per_round, self.rounds, coordinates,
            "clients per round (a higher client sampling rate also raises epsilon)", "rounds")

    def central_mechanism(self) -> CentralDP:
        return CentralDP(self.clip, self.noise_std, self.sample_rate * self.num_clients,
                         self.secure)


@dataclass(frozen=True)
class LocalLevel(_Private):
    """DP-FedLoRA with an untrusted server: each client clips and noises its own release."""

    sample_rate: ClassVar[float] = 1.0  # no sampling: no amplification credit
    mode: ClassVar[str] = "local"
    neighbouring: ClassVar[str] = (
        "replace one client's whole release: any two clipped updates differ by up to "
        "2 x clip (sensitivity = 2 x clip)"
    )

    @property
    def sensitivity(self) -> float:
        return 2 * self.clip

    def round_events(self, participants: Iterable[int]) -> dict[str, dp_accounting.DpEvent]:
        event = accounting.local_mode_event(self.noise_multiplier, 1)
        return {party(i): event for i in participants}

    def noise_to_signal(self, coordinates: int, participants: float) -> NoiseToSignal:
        # one client's release, noise std sigma x 2C against a clipped update of norm C
        per_release = noise_norm_over_clip(2 * self.noise_multiplier, coordinates)
        return noise_to_signal("one client's noised release", per_release,
                               self.rounds * participants, coordinates, "",
                               "rounds x clients per round")

    def release_mechanism(self) -> LocalDP:
        return LocalDP(self.clip, self.noise_multiplier, self.secure)


def predicted_signal(plan: PrivacyPlan, coordinates: int,
                     federation: FederationConfig) -> NoiseToSignal | None:
    """Return the plan's noise-to-signal for ``coordinates`` released numbers per client and the
    federation's expected clients per round (None without privacy)."""
    participants = plan.expected_participants(federation.num_clients, federation.per_round)
    return plan.noise_to_signal(coordinates, participants)


def _check_batch(q: float, largest: int, batch_size: int) -> None:
    """Refuse a sample rate that would give the largest client batches far above batch_size."""
    if q * largest > 4 * batch_size:
        raise ConfigError(
            f"privacy.sample_rate = {q:.4g} gives the largest client ({largest} examples) an "
            f"expected batch of {q * largest:.0f}, over 4 x train.batch_size = {4 * batch_size}; "
            "lower privacy.sample_rate or partition the data more evenly"
        )


def check_site(config: RunConfig, examples: int) -> None:
    """Refuse a site whose ``examples`` the config cannot train privately (sample mode): an
    expected batch far over train.batch_size, or privacy.delta not below 1 / its examples
    (a necessary condition for the population's delta; the server cannot see the population)."""
    p = config.privacy
    if p.mode != "sample" or p.sample_rate is None:
        return
    _check_batch(p.sample_rate, examples, config.train.batch_size)
    accounting.validate_delta(p.delta, examples,
                              "privacy.delta (population: at least this site's examples)")


def lacks_sample_rate(config: RunConfig) -> bool:
    """Return whether the config is in sample mode without the sample rate that mode needs."""
    return config.privacy.mode == "sample" and config.privacy.sample_rate is None


def suggest_sample_rate(batch_size: int, client_sizes: Sequence[int]) -> float:
    """Return batch_size / median client size, capped at 1: a starting point for the config.

    Computed where the data is (``privlora privacy plan``); the run itself never derives the
    rate from sizes, because a published rate would then reveal them.
    """
    sizes = sorted(client_sizes)
    median = sizes[len(sizes) // 2]
    return min(1.0, batch_size / median)


def make_plan(config: RunConfig, client_sizes: Sequence[int] | None) -> PrivacyPlan:
    """Build the plan ``privacy.mode`` names: sigma given or calibrated, epsilon forecast.

    ``client_sizes`` (examples per client) serve only the checks of sample mode; a deployed
    server does not know them (None), and each site checks its own (``check_site``).

    Raises ConfigError for settings that cannot protect anyone, PrivacyBudgetExceeded when the
    forecast exceeds privacy.target_epsilon.
    """
    p, fed = config.privacy, config.federation
    # sigma is a placeholder until it is given or calibrated below
    common = {"noise_multiplier": p.noise_multiplier or 1.0, "clip": p.clip, "delta": p.delta,
              "accountant": p.accountant, "target_epsilon": p.target_epsilon,
              "reproducible_noise": p.reproducible_noise, "rounds": fed.rounds,
              "num_clients": fed.num_clients}
    draft: _Private
    match p.mode:
        case "none":
            return NoPrivacy()
        case "sample":
            if p.sample_rate is None:
                raise ConfigError(
                    "privacy.mode = 'sample' needs privacy.sample_rate, the Poisson rate at which "
                    "each example joins a step; it must be fixed in the config, not derived from "
                    "the clients' example counts (that would publish them). `privlora privacy "
                    "plan` suggests one: train.batch_size / median client size"
                )
            if client_sizes is not None:
                check_site(config, max(client_sizes))
                accounting.validate_delta(p.delta, sum(client_sizes),
                                          "privacy.delta (population: all training examples)")
            draft = SampleLevel(**common, sample_rate=p.sample_rate,
                                steps_per_round=config.train.local_steps,
                                divisor=float(config.train.batch_size))
        case "client":
            accounting.validate_delta(p.delta, fed.num_clients, "privacy.delta (clients)")
            draft = ClientLevel(**common, sample_rate=fed.per_round / fed.num_clients)
        case "local":
            accounting.validate_delta(p.delta, fed.num_clients, "privacy.delta (clients)")
            draft = LocalLevel(**common)
        case _:
            raise AssertionError(f"config validation let privacy.mode = {p.mode!r} through")
    sigma = p.noise_multiplier
    if sigma is None:
        sigma, _ = accounting.calibrate_noise_multiplier(
            lambda s: dataclasses.replace(draft, noise_multiplier=s).forecast(),
            p.target_epsilon, p.delta, p.accountant)
    plan = dataclasses.replace(draft, noise_multiplier=sigma)
    if p.target_epsilon is not None and plan.epsilon > p.target_epsilon * (1 + 1e-9):
        raise PrivacyBudgetExceeded(
            f"this run would spend epsilon = {plan.epsilon:.3f} > privacy.target_epsilon = "
            f"{p.target_epsilon} ({p.accountant}); raise privacy.noise_multiplier, lower "
            "federation.rounds or train.local_steps, or drop noise_multiplier to calibrate it"
        )
    return plan

