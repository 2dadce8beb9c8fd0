"""One object per aggregation rule: what it trains, what it sends, how it aggregates.

``build_rule`` turns ``federation.aggregation`` into one of these once; nothing else looks at the
rule's name to decide behaviour. The math lives in ``privlora.aggregation`` (pure functions);
a rule picks which of them to apply. Client-level DP is a wrapper around any rule
(``WithCentralDP``, as Flower's DP strategies wrap a strategy): it clips and noises what the
rule says each client contributes (``contributions``: the factor updates for ``fedavg`` and
``ffa``, each client's change of its product for ``exact``) and hands the noisy mean back to the
rule (``apply``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from privlora import aggregation
from privlora.config import RunConfig
from privlora.lora import Adapter, flatten, is_factor_b
from privlora.privacy.central import CentralDP

Delta = dict[str, torch.Tensor]  # one client's factor update, wire names (lora.flatten order)


class Rule(Protocol):
    """An aggregation rule, as the protocol uses it."""

    name: str
    trains_a: bool  # False: A stays at its seeded init and never crosses the wire (FFA-LoRA)
    diagnostic: str | None  # the per-layer quantity logged each round (``<name>_max/_mean``)
    averages_products: bool  # True: the server averages products B A, not the factors
    mixes_ranks: bool  # True: clients may train lower ranks than lora.rank (heterogeneous ranks)

    def aggregate(self, global_adapter: Adapter, deltas: Sequence[Delta],
                  weights: Sequence[float]) -> tuple[Adapter, dict[str, float]]:
        """Return the next global adapter and per-layer diagnostics (no DP: weighted)."""
        ...

    def contributions(self, global_adapter: Adapter,
                      deltas: Sequence[Delta]) -> Iterable[dict[str, torch.Tensor]]:
        """What each client contributes to the mean, one at a time: what client DP clips."""
        ...

    def template(self, global_adapter: Adapter) -> dict[str, torch.Tensor]:
        """A contribution's names and shapes (the noise's, when no client was sampled)."""
        ...

    def apply(self, global_adapter: Adapter, template: dict[str, torch.Tensor],
              mean: dict[str, torch.Tensor]) -> tuple[Adapter, dict[str, float]]:
        """Return the next global adapter from the mean contribution (``template`` is
        ``self.template(global_adapter)``, computed once by the caller; no diagnostics: they
        would be computed from un-noised updates)."""
        ...


@dataclass(frozen=True)
class WithCentralDP:
    """Client-level DP (DP-FedAvg) around a rule: each client's contribution is clipped jointly
    over all its tensors, N(0, noise_std^2) is added to the sum, and the sum is divided by the
    expected count q N (``CentralDP.noisy_mean``). Every client weighs the same (counts are
    private and not sent), so ``weights`` are ignored."""

    rule: Rule
    central: CentralDP
    noise_rng: torch.Generator  # ignored when the mechanism draws from the OS CSPRNG

    def aggregate(self, global_adapter: Adapter, deltas: Sequence[Delta],
                  weights: Sequence[float]) -> tuple[Adapter, dict[str, float]]:
        template = self.rule.template(global_adapter)
        mean = self.central.noisy_mean(self.rule.contributions(global_adapter, deltas), template,
                                       self.noise_rng)
        return self.rule.apply(global_adapter, template, mean)


def _sent(global_adapter: Adapter, trains_a: bool) -> dict[str, torch.Tensor]:
    """The global factors a rule puts on the wire: the shapes a full-rank update has."""
    return {k: v for k, v in flatten(global_adapter).items() if trains_a or is_factor_b(k)}


class _FactorUpdates:
    """FedAvg and FFA under client DP: each client contributes its factor update (the factors
    the rule sends), and the noisy mean moves the factors."""

    trains_a: ClassVar[bool]

    def contributions(self, global_adapter: Adapter,
                      deltas: Sequence[Delta]) -> Iterable[Delta]:
        return iter(deltas)

    def template(self, global_adapter: Adapter) -> dict[str, torch.Tensor]:
        return _sent(global_adapter, self.trains_a)

    def apply(self, global_adapter: Adapter, template: Delta,
              mean: Delta) -> tuple[Adapter, dict[str, float]]:
        return aggregation.apply_delta(global_adapter, mean), {}


@dataclass(frozen=True)
class FedAvg(_FactorUpdates):
    """Average A and B separately (McMahan et al. 2017, per factor, as FlowerTune does)."""

    name: ClassVar[str] = "fedavg"
    trains_a: ClassVar[bool] = True
    diagnostic: ClassVar[str | None] = "factor_gap"
    averages_products: ClassVar[bool] = False
    mixes_ranks: ClassVar[bool] = False  # factors of different ranks have no mean

    def aggregate(self, global_adapter: Adapter, deltas: Sequence[Delta],
                  weights: Sequence[float]) -> tuple[Adapter, dict[str, float]]:
        adapters = [aggregation.apply_delta(global_adapter, d) for d in deltas]
        return (aggregation.fedavg(adapters, weights),
                aggregation.factor_product_gap(adapters, weights))


@dataclass(frozen=True)
class FFA(_FactorUpdates):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen at the shared seed; B trained, sent, averaged."""

    name: ClassVar[str] = "ffa"
    trains_a: ClassVar[bool] = False
    diagnostic: ClassVar[str | None] = None
    averages_products: ClassVar[bool] = False
    mixes_ranks: ClassVar[bool] = False  # B of different ranks against one frozen A: no mean

    def aggregate(self, global_adapter: Adapter, deltas: Sequence[Delta],
                  weights: Sequence[float]) -> tuple[Adapter, dict[str, float]]:
        adapters = [aggregation.apply_delta(global_adapter, d) for d in deltas]
        return aggregation.ffa(adapters, weights), {}


@dataclass(frozen=True)
class Exact:
    """Global product plus the mean of the clients' product changes, re-factorised by SVD.

    Each client's change of scale * B A is measured from its own start (its rank's share of the
    global adapter). With equal ranks this is exactly the weighted mean of the products B_k A_k
    (FlexLoRA, Bai et al. 2024); with mixed ranks a low-rank client moves the global product by
    what it learned. In client mode these changes are what is clipped and noised, so the rule is
    the same with and without DP. Products are formed one client at a time.
    """

    rank: int
    scale: float
    name: ClassVar[str] = "exact"
    trains_a: ClassVar[bool] = True
    diagnostic: ClassVar[str | None] = "svd_residual"
    averages_products: ClassVar[bool] = True
    mixes_ranks: ClassVar[bool] = True

    def aggregate(self, global_adapter: Adapter, deltas: Sequence[Delta],
                  weights: Sequence[float]) -> tuple[Adapter, dict[str, float]]:
        mean = aggregation.weighted_sum(self.contributions(global_adapter, deltas),
                                        aggregation.normalise_weights(weights))
        return self.apply(global_adapter, self.template(global_adapter), mean)

    def contributions(self, global_adapter: Adapter,
                      deltas: Sequence[Delta]) -> Iterable[dict[str, torch.Tensor]]:
        return (self._change(global_adapter, d) for d in deltas)  # one product at a time

    def template(self, global_adapter: Adapter) -> dict[str, torch.Tensor]:
        return aggregation.mean_products([global_adapter], [1.0], [self.scale])

    def apply(self, global_adapter: Adapter, template: dict[str, torch.Tensor],
              mean: dict[str, torch.Tensor]) -> tuple[Adapter, dict[str, float]]:
        return aggregation.exact(template, mean, self.rank, self.scale)  # template: B A now

    def _change(self, global_adapter: Adapter, delta: Delta) -> dict[str, torch.Tensor]:
        start = aggregation.apply_delta(global_adapter, {k: torch.zeros_like(v)
                                                         for k, v in delta.items()})
        return aggregation.product_change(start, aggregation.apply_delta(start, delta),
                                          self.scale)


def build_rule(config: RunConfig) -> Rule:
    """Return the rule ``federation.aggregation`` names."""
    match config.federation.aggregation:
        case "fedavg":
            return FedAvg()
        case "ffa":
            return FFA()
        case "exact":
            return Exact(config.lora.rank, config.lora.alpha / config.lora.rank)
    raise AssertionError(f"config validation let {config.federation.aggregation!r} through")
