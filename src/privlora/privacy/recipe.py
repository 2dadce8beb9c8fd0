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
  layers can express). Nor more coordinates where the forecast has room: tried and measured no
  better (SST-2 at epsilon 8, rank 4 on every layer, forecast 0.166: median 86.8% over 3 seeds
  against rank 2's 85.9%, paired mean +0.5 points, SE ~0.8; without noise 85.8% against 87.0%;
  built-in rank 7, 98.0% against 99.0%; bench/utility.py's +rankN cells). FFA also keeps the
  private learning rate trainable: SST-2's epsilon-8 recipe with A trained too (FedAvg, every
  layer, Adam 0.0163, no noise) stayed at the majority label, 50.9%, where FFA reached 87.0%;
  2x the steps at half the batch (87.5%) and q_proj too (85.8%) did no better without noise,
  nor half the learning rate at epsilon 8 (85.6% and 87.2% against 85.9% and 85.3%, seeds 0-1)
  (bench/utility.py's +KEY=VALUE cells);
- sample mode, many examples per step (the search and its constants: ``recipe_steps.py``): 3
  rounds; per client ``TOTAL_STEPS`` steps in all (42 = the demo's, or 2x, 4x); for each, the largest expected batch the compute budget pays for
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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from privlora.architectures import ModelFacts
from privlora.compute_budget import examples_in
from privlora.config import RunConfig, fixed_keys, flat_values, with_values
from privlora.privacy.recipe_steps import (
    BUDGET_KEY,
    Picks,
    public_steps,
    release_mode,
    sample_mode,
)
from privlora.privacy.signal import NoiseToSignal

DP_RANK = 2
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
    keys, fixed = wanted(config), fixed_keys(config)
    if not set(keys) - fixed:  # resolved before, or all set by the user
        values = flat_values(config)
        return Recipe(config, tuple(Choice(k, values[k], False, "") for k in keys))
    from privlora.architectures import model_facts

    private = config.privacy.mode != "none"
    facts = model_facts(config.model.name) if private else None
    if BUDGET_KEY not in keys or BUDGET_KEY in fixed:
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


def choose(config: RunConfig, model: ModelFacts | None,
           timed: tuple[int, str] | None = None) -> Recipe:
    """Choose every key of ``wanted(config)`` the user did not set, from ``config`` and
    ``model`` (needed under DP) alone: no data, no weights; ``timed`` is the budget in examples
    that ``train.max_minutes`` bought on this machine, and why. Every wanted key of the result
    is fixed, so resolving it again changes nothing."""
    picks, reasons, signal = Picks(config, fixed_keys(config)), [], None
    if timed is not None:
        picks.set(BUDGET_KEY, *timed)
    elif config.train.max_minutes and picks.mine(BUDGET_KEY):
        reasons.append(f"train.max_minutes = {config.train.max_minutes:g} not used: "
                       f"train.max_examples_processed = {config.train.max_examples_processed:,} "
                       "is set (by you, or by an earlier resolution of this config)")
    reasons += _pick_adapter(picks, model)
    match config.privacy.mode:
        case "none":
            reasons += public_steps(picks)
        case "sample":
            assert model is not None
            reasons_s, signal = sample_mode(picks, model)
            reasons += reasons_s
        case _:
            assert model is not None
            reasons_r, signal = release_mode(picks, model)
            reasons += reasons_r
    keys = wanted(config)
    resolved = with_values(config, {k: picks.get(k) for k in keys})
    choices = tuple(Choice(k, picks.get(k), k in picks.values, picks.why.get(k, ""))
                    for k in keys)
    return Recipe(resolved, choices, tuple(reasons), signal)


def _pick_adapter(picks: Picks, model: ModelFacts | None) -> list[str]:
    """The loss and, under DP, the adapter (FFA, rank, modules, layers): everything before the
    budget. Returns the reasons to print."""
    reasons = _pick_loss(picks)
    if picks.config.privacy.mode != "none":
        assert model is not None, "auto under DP needs the model's facts"
        _few_coordinates(picks, model)
    return reasons


def _pick_loss(picks: Picks) -> list[str]:
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
    picks = Picks(config, fixed_keys(config))
    _pick_adapter(picks, model)
    return picks.resolved()


def _few_coordinates(picks: Picks, model: ModelFacts) -> None:
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


