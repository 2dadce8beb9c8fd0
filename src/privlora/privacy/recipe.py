"""``privacy.recipe = "auto"``: choose a run's recipe from public, declared quantities only.

What it reads: the config (a key the user set always wins), the target epsilon and delta, the
number of clients, the examples per client the user DECLARES (``data.examples_per_client``,
never counted from a site's data), the model's shapes (``architectures.ModelFacts``, from its
config, no weights) and the task kind. It never opens the data, so it costs no privacy: what it
chooses is a function of what the run's published config.toml holds anyway. It runs once,
before the run; the chosen values are then fixed (``RunConfig.explicit``) and saved, so a
resumed run or a Flower site reads the same concrete values.

The rule, from the measured runs (README, "Private training that learns: the recipe"; the demo,
FFA rank 2 on v_proj, Poisson batches of 36 of ~20,000 per client, label-only loss, Adam 2e-2,
3 rounds x 14 steps, reached 96.5% at epsilon 7.955):
- classification: ``train.loss = "label"`` (the clipped gradient carries only the class);
- under DP, few released coordinates: FFA (B only), rank 2, the value projection only, and the
  last layers only when that still releases over ``MAX_COORDINATES``. Not fewer layers to lower
  a marginal forecast: tried and measured worse (FPB, 4 clients x 510, epsilon 2, seed 0: the
  last 7 layers reached 65.5% at lr 0.034 and 64.5% at lr 0.016, the majority class, where
  every layer reached 87.5%; the forecast counts noise per coordinate, not what the adapted
  layers can express);
- sample mode, many examples per step: 3 rounds; per client ``TOTAL_STEPS`` steps in all (42
  = the demo's, or 2x, 4x); for each, the largest expected batch the compute budget pays for
  (at most a quarter of the declared examples, ``BATCH_MAX``); sample rate = batch / declared
  examples; sigma calibrated by the plan; the candidate whose noise-to-signal forecast
  (``privacy.signal``, the plan's own function) is lowest wins. For a fixed budget that is the
  fewest steps with the largest batch, the README's "batch size mattered more than steps";
  more steps win once the batch hits its cap. When the winner's forecast is not "learns", the
  reasons name the smaller of ``BUDGET_FACTORS`` x the budget that would forecast "learns", or
  say that neither does (the budget is the user's: auto reports, it does not spend more);
- Adam's learning rate scales with the square root of the batch (Malladi et al., NeurIPS 2022,
  "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", the square-root rule):
  2e-2 x sqrt(batch / 36), within [1e-2, 5e-2] (the GPU sweep's range that learned);
- client and local modes: a round releases one clipped update per client whatever the local
  training did, so privacy is paid per round and local steps cost only compute. Rounds: of
  ``RELEASE_ROUNDS``, the one whose noise-to-signal forecast is lowest (sigma calibrated for each
  by the plan; fewer rounds on a tie); the budget then buys local steps of ``RELEASE_BATCH``
  examples (at most a quarter of the declared examples), each declared example seen at most
  ``PUBLIC_PASSES`` times. Not yet measured on the task families (bench/utility.py): the rule is
  the forecast's, the budget's and the mechanism's, nothing more;
- without DP: local steps so that each declared example is seen about twice within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from privlora.architectures import ModelFacts
from privlora.compute_budget import examples_in
from privlora.config import RunConfig, fixed_keys, flat_values, with_values
from privlora.errors import ConfigError, PrivacyBudgetExceeded
from privlora.privacy.plan import make_plan, predicted_signal
from privlora.privacy.signal import NoiseToSignal

PRIVATE_BUDGET = 4_096  # default example-gradients under DP (the demo's run: 3,024)
PUBLIC_PASSES = 2  # without DP: passes over the declared data
PUBLIC_BUDGET_CAP = 65_536  # default budget cap without DP
DP_ROUNDS = 3
TOTAL_STEPS = (42, 84, 168)  # steps per client over the run: the demo's 3 x 14, then 2x, 4x
BUDGET_KEY = "train.max_examples_processed"
BUDGET_FACTORS = (4, 16)  # a marginal forecast: the larger budgets auto reports on
DEMO_BATCH, DEMO_LR, LR_RANGE = 36, 2e-2, (1e-2, 5e-2)
BATCH_MIN, BATCH_MAX, DATA_SHARE = 16, 1024, 4  # expected batch <= declared examples / 4
DP_RANK = 2
RELEASE_ROUNDS = (3, 5, 10, 20)  # client and local modes: the rounds auto compares
RELEASE_BATCH = 32  # client and local modes: examples per local step (no per-example clip)
MAX_COORDINATES = 16_384  # the demo releases 11,520; more: adapt the last layers only
VALUE_PROJECTION = "v_proj"
PUBLIC_INPUTS = ("auto reads only public, declared quantities (this config, epsilon and delta, "
                 "the number of clients, data.examples_per_client as declared, the model's "
                 "shapes, the task kind; with train.max_minutes, this machine's speed on "
                 "synthetic examples); it never reads the data, so it costs no privacy")


@dataclass(frozen=True)
class Choice:
    """One key auto decides: its value, whether auto chose it or the user set it, and why."""

    key: str
    value: Any
    auto: bool
    why: str


@dataclass(frozen=True)
class Recipe:
    """A resolved config, what auto decided in it, and the reasons (empty when manual)."""

    config: RunConfig
    choices: tuple[Choice, ...] = ()
    reasons: tuple[str, ...] = ()
    signal: NoiseToSignal | None = None  # the chosen recipe's forecast (sample mode)

    def lines(self) -> list[str]:
        """The recipe in words, as ``privlora privacy plan`` and ``privlora run`` print it."""
        if self.config.privacy.recipe != "auto":
            return []
        width = max((len(c.key) for c in self.choices), default=0)
        return [f"recipe: auto; {PUBLIC_INPUTS}",
                *(f"  {c.key:<{width}} = {_shown(c.value)}  "
                  + (f"(auto: {c.why})" if c.auto else "(set in the config)") for c in self.choices),
                *(f"  {reason}" for reason in self.reasons)]

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.config.privacy.recipe,
                "chosen": {c.key: c.value for c in self.choices if c.auto},
                "set_in_config": {c.key: c.value for c in self.choices if not c.auto},
                "why": {c.key: c.why for c in self.choices if c.auto},
                "reasons": list(self.reasons)}


def _shown(value: Any) -> str:
    """A value as the config file writes it."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def resolve(config: RunConfig,
            timer: Callable[[RunConfig], float] | None = None) -> Recipe:
    """Return ``config`` with auto's choices made (itself when manual or already resolved).

    The steps that are not pure: it reads the model's config (shapes, no weights) under DP, and
    with ``train.max_minutes`` it times the local step of a first draft of the recipe on this
    machine (``timer``, default ``compute_budget.seconds_per_example``: synthetic examples, no
    data) to turn the minutes into ``train.max_examples_processed``, then chooses again.
    """
    if config.privacy.recipe != "auto":
        return Recipe(config)
    if not set(wanted(config)) - fixed_keys(config):  # resolved before, or all set by the user
        values = flat_values(config)
        return Recipe(config, tuple(Choice(k, values[k], False, "") for k in wanted(config)))
    from privlora.architectures import model_facts

    private = config.privacy.mode != "none"
    facts = model_facts(config.model.name) if private else None
    if BUDGET_KEY not in wanted(config) or BUDGET_KEY in fixed_keys(config):
        return choose(config, facts)
    if timer is None:
        from privlora.compute_budget import seconds_per_example as timer
    per_example = timer(adapter_draft(config, facts))
    minutes = config.train.max_minutes
    budget = examples_in(minutes, per_example)
    return choose(config, facts, (budget, (
        f"{minutes:g} minutes of training at {per_example * 1000:.3g} ms per example, the local "
        f"step timed on this machine with {config.data.max_length}-token synthetic examples "
        "(no data; real examples are usually shorter, so the run usually takes less)")))


def wanted(config: RunConfig) -> tuple[str, ...]:
    """Return the keys auto decides for ``config``'s mode and task."""
    keys = ["train.loss"] if task_kind(config) else []
    mode = config.privacy.mode
    if mode != "none":
        # heterogeneous ranks need aggregation 'exact' and ranks <= lora.rank: the user's call
        keys += [] if config.lora.client_ranks else ["federation.aggregation", "lora.rank"]
        keys += ["lora.target_modules", "lora.last_layers"]
    if mode == "sample":
        keys += ["federation.rounds", "train.local_steps", "train.batch_size",
                 "privacy.sample_rate"]
        keys += ["train.lr"] if config.train.optimizer == "adamw" else []
    if mode in ("client", "local"):
        keys += ["federation.rounds", "train.local_steps", "train.batch_size"]
    if mode == "none" and config.data.examples_per_client:
        keys += ["train.local_steps"]
    if config.train.max_minutes:  # the minutes, as examples on this machine
        keys += [BUDGET_KEY]
    return tuple(keys)


def task_kind(config: RunConfig) -> str | None:
    """Return the task kind from the config alone (None when only the data would tell)."""
    d = config.data
    if d.kind != "auto":
        return d.kind
    return "classification" if d.path == "builtin" or d.text_fields else None


@dataclass
class _Picks:
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


def _released(picks: _Picks, model: ModelFacts) -> int:
    """The coordinates each client releases with the adapter chosen so far."""
    return model.coordinates(picks.get("lora.target_modules"), picks.get("lora.rank"),
                             picks.get("lora.last_layers"),
                             picks.get("federation.aggregation") != "ffa")


def _budget_words(picks: _Picks, budget: int) -> str:
    """The compute budget as the reasons print it: set by the user, from train.max_minutes,
    or auto's default."""
    if picks.get("train.max_examples_processed") and not picks.mine("train.max_examples_processed"):
        return f"{budget:,} (from train.max_minutes = {picks.config.train.max_minutes:g})"
    return (f"train.max_examples_processed = {budget:,}" if picks.get("train.max_examples_processed")
            else f"{budget:,} (auto's default; set train.max_examples_processed or max_minutes)")


def choose(config: RunConfig, model: ModelFacts | None,
           timed: tuple[int, str] | None = None) -> Recipe:
    """Choose every key of ``wanted(config)`` the user did not set, from ``config`` and
    ``model`` (needed under DP) alone: no data, no weights; ``timed`` is the budget in examples
    that ``train.max_minutes`` bought on this machine, and why. Every wanted key of the result
    is fixed, so resolving it again changes nothing."""
    picks, reasons, signal = _Picks(config, fixed_keys(config)), [], None
    if timed is not None:
        picks.set(BUDGET_KEY, *timed)
    elif config.train.max_minutes and picks.mine(BUDGET_KEY):
        reasons.append(f"train.max_minutes = {config.train.max_minutes:g} not used: "
                       f"train.max_examples_processed = {config.train.max_examples_processed:,} "
                       "is set (by you, or by an earlier resolution of this config)")
    reasons += _pick_loss(picks)
    match config.privacy.mode:
        case "none":
            reasons += _public_steps(picks)
        case "sample":
            assert model is not None, "auto under DP needs the model's facts"
            _few_coordinates(picks, model)
            reasons_s, signal = _sample_mode(picks, model)
            reasons += reasons_s
        case _:
            assert model is not None, "auto under DP needs the model's facts"
            _few_coordinates(picks, model)
            reasons_r, signal = _release_mode(picks, model)
            reasons += reasons_r
    keys = wanted(config)
    resolved = with_values(config, {k: picks.get(k) for k in keys})
    choices = tuple(Choice(k, picks.get(k), k in picks.values, picks.why.get(k, ""))
                    for k in keys)
    return Recipe(resolved, choices, tuple(reasons), signal)


def _pick_loss(picks: _Picks) -> list[str]:
    """The label-only loss for classification, the answer loss for generation."""
    kind = task_kind(picks.config)
    if kind == "classification":
        picks.set("train.loss", "label", "a classification task: cross-entropy over the label "
                  "words only, so each clipped gradient carries only the class (labels must be "
                  "one token each; else set train.loss = 'answer')")
    elif kind == "generation":
        picks.set("train.loss", "answer", "a generation task")
    else:
        return [("train.loss: only the data would tell the task kind; set data.kind to let "
                 "auto choose ('classification' -> the label-only loss)")]
    return []


def adapter_draft(config: RunConfig, model: ModelFacts | None) -> RunConfig:
    """``config`` with auto's loss and, under DP, its adapter (FFA, rank, modules, layers): what
    a local step's cost depends on, before any budget is known (train.max_minutes times it)."""
    picks = _Picks(config, fixed_keys(config))
    _pick_loss(picks)
    if config.privacy.mode != "none":
        assert model is not None, "auto under DP needs the model's facts"
        _few_coordinates(picks, model)
    return picks.resolved()


def _few_coordinates(picks: _Picks, model: ModelFacts) -> None:
    """Under DP: FFA, rank 2, the value projection; the last layers only if still too many."""
    picks.set("federation.aggregation", "ffa",
              "FFA-LoRA: A stays at its seeded init; only B is trained and released")
    picks.set("lora.rank", DP_RANK, f"rank {DP_RANK}: few released coordinates (the demo's)")
    value = (VALUE_PROJECTION,) if VALUE_PROJECTION in model.modules else ()
    picks.set("lora.target_modules", value,
              "the value projection only: the fewest coordinates that learned" if value else
              "no separate value projection in this family: its default modules")
    targets, rank = picks.get("lora.target_modules"), picks.get("lora.rank")
    trains_a = picks.get("federation.aggregation") != "ffa"
    per_layer = model.coordinates(targets, rank, 1, trains_a)
    every = model.coordinates(targets, rank, 0, trains_a)
    last = 0 if every <= MAX_COORDINATES else max(1, MAX_COORDINATES // per_layer)
    picks.set("lora.last_layers", last,
              f"all {model.layers} layers: {every:,} released coordinates, within "
              f"{MAX_COORDINATES:,}" if not last else
              f"the last {last} of {model.layers} layers, so at most {MAX_COORDINATES:,} "
              f"coordinates are released (all layers: {every:,}); backward stops below them")


def _sample_mode(picks: _Picks, model: ModelFacts) -> tuple[list[str], NoiseToSignal]:
    """Search rounds x steps x batch within the budget for the best noise-to-signal forecast."""
    c = picks.config
    n, m = c.data.examples_per_client, c.federation.per_round
    budget = picks.get("train.max_examples_processed") or PRIVATE_BUDGET
    picks.set("federation.rounds", DP_ROUNDS, f"{DP_ROUNDS} rounds (the demo's)")
    rounds = picks.get("federation.rounds")
    steps_options = ([picks.get("train.local_steps")] if picks.mine("train.local_steps")
                     else sorted({math.ceil(t / rounds) for t in TOTAL_STEPS}))
    coordinates = _released(picks, model)
    tried = _candidates(picks, steps_options, budget, coordinates)
    if not tried:
        smallest = rounds * min(steps_options) * m * min(BATCH_MIN, max(1, n // DATA_SHARE))
        raise ConfigError(
            f"a compute budget of {_budget_words(picks, budget)} cannot pay for a private "
            f"recipe that learns: the smallest is {rounds} rounds x {min(steps_options)} steps "
            f"x {m} clients x a batch of {BATCH_MIN} = {smallest:,} examples; raise it, or set "
            "train.local_steps, train.batch_size and federation.rounds yourself")
    whole, examples, steps, values, signal = min(tried, key=lambda t: (t[0], t[1]))
    batch = examples // (rounds * steps * m)
    picks.set("train.local_steps", steps, f"{rounds * steps} steps per client in all: the "
              "candidate with the best forecast (below)")
    for key, value in values.items():
        picks.set(key, value, _STEP_WHY[key])
    budget_words = _budget_words(picks, budget)
    reasons = [
        f"budget: {budget_words} example-gradients; {coordinates:,} released coordinates",
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


def _candidates(picks: _Picks, steps_options: list[int], budget: int,
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


def _larger_budget(picks: _Picks, steps_options: list[int], budget: int,
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


def _release_mode(picks: _Picks, model: ModelFacts) -> tuple[list[str], NoiseToSignal]:
    """Client and local modes: the rounds with the best forecast, then local steps from the
    compute budget (they cost no privacy: each round's release is clipped as a whole)."""
    c = picks.config
    n, m = c.data.examples_per_client, c.federation.per_round
    # local training costs no privacy here: the default budget is the public one when the data
    # is declared (two passes, capped), else the private default
    default = (min(PUBLIC_PASSES * c.federation.num_clients * n, PUBLIC_BUDGET_CAP) if n
               else PRIVATE_BUDGET)
    budget = picks.get("train.max_examples_processed") or default
    coordinates, base = _released(picks, model), picks.resolved()
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
    budget_words = _budget_words(picks, budget)
    reasons = [
        f"budget: {budget_words} examples; {coordinates:,} released coordinates per client",
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


def _step_values(picks: _Picks, n: int, affordable: int) -> dict[str, Any] | None:
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


def _public_steps(picks: _Picks) -> list[str]:
    """Without DP: local steps so that each declared example is seen about twice."""
    c = picks.config
    n, fed = c.data.examples_per_client, c.federation
    if not n:
        return [("train.local_steps: declare data.examples_per_client to let auto scale the "
                 "steps to the data")]
    total = fed.num_clients * n
    budget = picks.get("train.max_examples_processed") or min(PUBLIC_PASSES * total,
                                                               PUBLIC_BUDGET_CAP)
    per_step = fed.rounds * fed.per_round * c.train.batch_size
    steps = max(1, min(budget, PUBLIC_PASSES * total) // per_step)
    picks.set("train.local_steps", steps,
              f"{fed.rounds} rounds x {fed.per_round} clients x {steps} steps x batch "
              f"{c.train.batch_size} = {steps * per_step:,} examples: about "
              f"{steps * per_step / total:.2g} passes over the {total:,} declared")
    return [f"budget: {budget:,} examples processed"
            + ("" if picks.get("train.max_examples_processed") else
               f" (auto's default: {PUBLIC_PASSES} passes, at most {PUBLIC_BUDGET_CAP:,})")]
