"""How much training ``privacy.recipe = "auto"`` buys: rounds, local steps and batch within a
compute budget, from the declared examples per client and the plan's forecast (``recipe.py``
chooses the rest and explains the rule; this is its search).

Sample mode: 3 rounds, ``TOTAL_STEPS`` steps per client in all, the largest expected batch the
budget pays for (at most ``BATCH_MAX`` and a ``DATA_SHARE``th of the declared examples), the
candidate with the lowest forecast; when that is not "learns", which of ``BUDGET_FACTORS`` x the
budget would be. Client and local modes: the rounds of ``RELEASE_ROUNDS`` with the lowest
forecast, then local steps of ``RELEASE_BATCH``. Without DP: about ``PUBLIC_PASSES`` passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from privlora.architectures import ModelFacts
from privlora.config import RunConfig, flat_values, with_values
from privlora.errors import ConfigError, PrivacyBudgetExceeded
from privlora.privacy.plan import make_plan, predicted_signal
from privlora.privacy.signal import NoiseToSignal

PRIVATE_BUDGET = 4_096  # default example-gradients under DP (the demo's run: 3,024)
PUBLIC_PASSES = 2  # without DP: passes over the declared data
PUBLIC_BUDGET_CAP = 65_536  # default budget cap without DP
DP_ROUNDS = 3
# steps per client over the run: the demo's 3 x 14, then 2x, 4x. Not fewer: 21 steps of twice the
# batch forecast lower on FPB (0.165 against 0.209) but measured no better (91.5% and 86.0% against
# 90.5% and 89.0%, seeds 0 and 2; docs/private-recipes.md)
TOTAL_STEPS = (42, 84, 168)
BUDGET_KEY = "train.max_examples_processed"
BUDGET_FACTORS = (4, 16)  # a marginal forecast: the larger budgets auto reports on
DEMO_BATCH, DEMO_LR, LR_RANGE = 36, 2e-2, (1e-2, 5e-2)
BATCH_MIN, BATCH_MAX, DATA_SHARE = 16, 1024, 4  # expected batch <= declared examples / 4
RELEASE_ROUNDS = (3, 5, 10, 20)  # client and local modes: the rounds auto compares
RELEASE_BATCH = 32  # client and local modes: examples per local step (no per-example clip)


@dataclass
class Picks:
    """What auto has chosen so far; a key the user set is never overwritten."""

    config: RunConfig
    user: frozenset[str]
    values: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: Any, why: str) -> None:
        if key not in self.user:
            self.values[key], self.why[key] = value, why

    def get(self, key: str) -> Any:
        return self.values[key] if key in self.values else flat_values(self.config)[key]

    def mine(self, key: str) -> bool:
        return key in self.user

    def resolved(self) -> RunConfig:
        """The config with what auto has chosen so far."""
        return with_values(self.config, {k: self.get(k) for k in self.values})


def released(picks: Picks, model: ModelFacts) -> int:
    """The coordinates each client releases with the adapter chosen so far."""
    return model.coordinates(picks.get("lora.target_modules"), picks.get("lora.rank"),
                             picks.get("lora.last_layers"),
                             picks.get("federation.aggregation") != "ffa")


def budget_words(picks: Picks, budget: int) -> str:
    """The compute budget as the reasons print it: set by the user, from train.max_minutes,
    or auto's default."""
    if picks.get(BUDGET_KEY) and not picks.mine(BUDGET_KEY):
        return f"{budget:,} (from train.max_minutes = {picks.config.train.max_minutes:g})"
    return (f"train.max_examples_processed = {budget:,}" if picks.get(BUDGET_KEY)
            else f"{budget:,} (auto's default; set train.max_examples_processed or max_minutes)")


def sample_mode(picks: Picks, model: ModelFacts) -> tuple[list[str], NoiseToSignal]:
    """Search rounds x steps x batch within the budget for the best noise-to-signal forecast."""
    c = picks.config
    n, m = c.data.examples_per_client, c.federation.per_round
    budget = picks.get(BUDGET_KEY) or PRIVATE_BUDGET
    picks.set("federation.rounds", DP_ROUNDS, f"{DP_ROUNDS} rounds (the demo's)")
    rounds = picks.get("federation.rounds")
    steps_options = ([picks.get("train.local_steps")] if picks.mine("train.local_steps")
                     else sorted({math.ceil(t / rounds) for t in TOTAL_STEPS}))
    coordinates = released(picks, model)
    tried = _candidates(picks, steps_options, budget, coordinates)
    if not tried:
        smallest = rounds * min(steps_options) * m * min(BATCH_MIN, max(1, n // DATA_SHARE))
        raise ConfigError(
            f"a compute budget of {budget_words(picks, budget)} cannot pay for a private "
            f"recipe that learns: the smallest is {rounds} rounds x {min(steps_options)} steps "
            f"x {m} clients x a batch of {BATCH_MIN} = {smallest:,} examples; raise it, or set "
            "train.local_steps, train.batch_size and federation.rounds yourself")
    whole, examples, steps, values, signal = min(tried, key=lambda t: (t[0], t[1]))
    batch = examples // (rounds * steps * m)
    picks.set("train.local_steps", steps, f"{rounds * steps} steps per client in all: the "
              "candidate with the best forecast (below)")
    for key, value in values.items():
        picks.set(key, value, _STEP_WHY[key])
    words = budget_words(picks, budget)
    reasons = [
        f"budget: {words} example-gradients; {coordinates:,} released coordinates",
        "candidates (steps per round x expected batch -> whole-run noise-to-signal): "
        + ", ".join(f"{s} x {e // (rounds * s * m)} -> {w:.3g}" for w, e, s, _, _ in tried),
        (f"chosen: {rounds} rounds x {steps} steps x {m} clients x {batch} = {examples:,} "
         f"example-gradients; forecast {whole:.3g} -> {signal.verdict.upper()}"),
    ]
    if examples > budget:
        reasons.append(f"your settings process {examples:,} examples, over the budget {budget:,}")
    fixed = ("train.batch_size", "privacy.sample_rate", "privacy.noise_multiplier")
    if signal.verdict != "learns" and not any(picks.mine(k) for k in fixed):
        # a set sigma with a target epsilon: a larger batch would overspend it
        reasons.append(_larger_budget(picks, steps_options, budget, coordinates))
    return reasons, signal


def _candidates(picks: Picks, steps_options: list[int], budget: int,
                coordinates: int) -> list[tuple[float, int, int, dict[str, Any], NoiseToSignal]]:
    """Return (forecast, examples, steps, values, signal) of each steps option the budget pays
    for: the largest batch it affords, sigma calibrated by the plan for the target epsilon."""
    c = picks.config
    n, m = c.data.examples_per_client, c.federation.per_round
    rounds, base = picks.get("federation.rounds"), picks.resolved()
    tried = []
    for steps in steps_options:
        values = _step_values(picks, n, budget // (rounds * steps * m))
        if values is None:
            continue
        candidate = with_values(base, {"federation.rounds": rounds, "train.local_steps": steps,
                                       **values})
        try:
            plan = make_plan(candidate, [n] * c.federation.num_clients)
        except PrivacyBudgetExceeded:  # noise_multiplier and target_epsilon both set
            continue
        signal = predicted_signal(plan, coordinates, candidate.federation)
        assert signal is not None
        examples = rounds * steps * m * candidate.train.batch_size
        tried.append((signal.whole_run, examples, steps, values, signal))
    return tried


def _larger_budget(picks: Picks, steps_options: list[int], budget: int,
                   coordinates: int) -> str:
    """Say which larger compute budget (of ``BUDGET_FACTORS`` x) would forecast "learns"."""
    for factor in BUDGET_FACTORS:
        # sigma is calibrated for each candidate and no user key is fixed (the caller checks),
        # so a larger budget affords at least the smaller one's candidates
        whole, *_, signal = min(_candidates(picks, steps_options, budget * factor, coordinates),
                                key=lambda t: (t[0], t[1]))
        if signal.verdict == "learns":
            return (f"to forecast LEARNS: train.max_examples_processed = {budget * factor:,} "
                    f"(x{factor} compute) forecasts {whole:.3g}")
    return (f"even train.max_examples_processed = {budget * factor:,} (x{factor} compute) "
            f"forecasts {whole:.3g} -> {signal.verdict.upper()}: more examples per client or a "
            "larger epsilon")


def release_mode(picks: Picks, model: ModelFacts) -> tuple[list[str], NoiseToSignal]:
    """Client and local modes: the rounds with the best forecast, then local steps from the
    compute budget (they cost no privacy: each round's release is clipped as a whole)."""
    c = picks.config
    n, m = c.data.examples_per_client, c.federation.per_round
    # local training costs no privacy here: the default budget is the public one when the data
    # is declared (two passes, capped), else the private default
    default = (min(PUBLIC_PASSES * c.federation.num_clients * n, PUBLIC_BUDGET_CAP) if n
               else PRIVATE_BUDGET)
    budget = picks.get(BUDGET_KEY) or default
    coordinates, base = released(picks, model), picks.resolved()
    options = ([picks.get("federation.rounds")] if picks.mine("federation.rounds")
               else list(RELEASE_ROUNDS))
    tried = []
    for rounds in options:
        candidate = with_values(base, {"federation.rounds": rounds})
        try:
            plan = make_plan(candidate, [n] * c.federation.num_clients if n else None)
        except PrivacyBudgetExceeded:  # noise_multiplier and target_epsilon both set
            continue
        signal = predicted_signal(plan, coordinates, candidate.federation)
        assert signal is not None
        tried.append((round(signal.whole_run, 4), rounds, signal))
    if not tried:
        raise ConfigError(f"no number of rounds among {options} fits privacy.target_epsilon with "
                          "privacy.noise_multiplier as set; leave the noise multiplier to the "
                          "plan (remove it) or set federation.rounds yourself")
    whole, rounds, signal = min(tried, key=lambda t: (t[0], t[1]))
    picks.set("federation.rounds", rounds,
              "the candidate with the best forecast (below); each round is one release")
    cap = max(1, n // DATA_SHARE) if n else RELEASE_BATCH
    picks.set("train.batch_size", min(RELEASE_BATCH, cap),
              f"{RELEASE_BATCH} examples per step (at most a {DATA_SHARE}th of the declared "
              "examples): steps cost no privacy in this mode, only compute")
    batch = picks.get("train.batch_size")
    affordable = budget // (rounds * m * batch)
    passes = PUBLIC_PASSES * n // (rounds * batch) if n else affordable
    steps = max(1, min(affordable, passes))
    picks.set("train.local_steps", steps,
              f"{rounds} rounds x {m} clients x {steps} steps x batch {batch} = "
              f"{rounds * m * steps * batch:,} examples, within the budget {budget:,}"
              + (f" and {PUBLIC_PASSES} passes over the {n:,} declared per client" if n else ""))
    words = budget_words(picks, budget)
    reasons = [
        f"budget: {words} examples; {coordinates:,} released coordinates per client",
        "candidates (rounds -> whole-run noise-to-signal): "
        + ", ".join(f"{r} -> {w:.3g}" for w, r, _ in tried),
        f"chosen: {rounds} rounds; forecast {whole:.3g} -> {signal.verdict.upper()}",
    ]
    return reasons, signal


_STEP_WHY = {
    "train.batch_size": "the largest expected batch the budget pays for (at most "
                        f"{BATCH_MAX} and a {DATA_SHARE}th of the declared examples)",
    "privacy.sample_rate": "expected batch / data.examples_per_client (declared)",
    "train.lr": f"Adam, square-root rule: {DEMO_LR:g} x sqrt(batch / {DEMO_BATCH}), within "
                f"[{LR_RANGE[0]:g}, {LR_RANGE[1]:g}]",
}


def _step_values(picks: Picks, n: int, affordable: int) -> dict[str, Any] | None:
    """Return batch, sample rate and lr for one candidate (None if the budget cannot pay the
    smallest batch); the user's batch or rate wins, and fixes the other."""
    if picks.mine("train.batch_size"):
        batch = picks.get("train.batch_size")
    elif picks.mine("privacy.sample_rate"):
        batch = max(1, round(picks.get("privacy.sample_rate") * n))
    else:
        cap = max(1, n // DATA_SHARE)
        batch = min(affordable, BATCH_MAX, cap)
        if batch < min(BATCH_MIN, cap):
            return None
    rate = (picks.get("privacy.sample_rate") if picks.mine("privacy.sample_rate")
            else min(1.0, batch / n))
    values: dict[str, Any] = {"train.batch_size": batch, "privacy.sample_rate": rate}
    if picks.config.train.optimizer == "adamw" and not picks.mine("train.lr"):
        lr = DEMO_LR * math.sqrt(batch / DEMO_BATCH)
        values["train.lr"] = round(min(max(lr, LR_RANGE[0]), LR_RANGE[1]), 5)
    return {k: v for k, v in values.items() if not picks.mine(k)}


def public_steps(picks: Picks) -> list[str]:
    """Without DP: local steps so that each declared example is seen about twice."""
    c = picks.config
    n, fed = c.data.examples_per_client, c.federation
    if not n:
        return [("train.local_steps: declare data.examples_per_client to let auto scale the "
                 "steps to the data")]
    total = fed.num_clients * n
    budget = picks.get(BUDGET_KEY) or min(PUBLIC_PASSES * total,
                                                               PUBLIC_BUDGET_CAP)
    per_step = fed.rounds * fed.per_round * c.train.batch_size
    steps = max(1, min(budget, PUBLIC_PASSES * total) // per_step)
    picks.set("train.local_steps", steps,
              f"{fed.rounds} rounds x {fed.per_round} clients x {steps} steps x batch "
              f"{c.train.batch_size} = {steps * per_step:,} examples: about "
              f"{steps * per_step / total:.2g} passes over the {total:,} declared")
    return [f"budget: {budget:,} examples processed"
            + ("" if picks.get(BUDGET_KEY) else
               f" (auto's default: {PUBLIC_PASSES} passes, at most {PUBLIC_BUDGET_CAP:,})")]
