"""``privlora audit``: one federated training run with canaries, and the empirical lower bound on
epsilon it gives, beside the accountant's epsilon (Steinke, Nasr & Jagielski 2023).

Each kind of canary is included independently with probability 1/2 and scored after the run:

- ``gradient`` (sample mode, and no DP): white-box canaries at site 0, examples whose clipped
  gradient is a fixed random direction of norm = clip (``privacy.audit.GradientCanaries``);
  score = minus the inner product of the final adapter's change with the direction.
- ``input`` (sample mode, and no DP): input-space canaries at site 0, extra examples made of a
  random secret string with a random label (a random answer for a generation task), sampled
  like the site's own; score = the drop of the canary's training loss from the base model to
  the trained one (a black-box attack: no access to gradients).
- ``client`` (client mode, and no DP): canary clients, whose update is a fixed random direction
  of norm 10 x clip, sampled like the real clients each round; score = <final change, u>.
- ``release`` (local mode): canary releases at site 0, passed through the site's own release
  mechanism every round; score = the sum over rounds of <release, u>, what an untrusted server
  sees (``privacy.audit.ReleaseCanaries``).

The audit's run is a normal run of the config plus the canaries, written to a temporary
directory that is deleted: nothing with canaries is ever kept, and no config can ask for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privlora import data, rounds, simulation
from privlora.config import RunConfig
from privlora.data import Example, collate
from privlora.errors import ConfigError
from privlora.lm import device_of, per_example_loss
from privlora.lora import Adapter, flatten, trained_parameters, unflatten, write_adapter
from privlora.privacy.audit import (
    ClientCanaries,
    GradientCanaries,
    ReleaseCanaries,
    audit_bound,
    random_directions,
    roc_auc,
)
from privlora.privacy.mechanisms import secure_uniform, seeded_generator, uniform
from privlora.run_dir import atomic_write, check_target, last_checkpoint

CONFIDENCE = 0.95
SITE = 0  # the site that holds the gradient, input and release canaries
# Canary clients' and releases' norm before the clip: a working clip cuts them to the
# sensitivity, while a clip that is missing would let them through ten times stronger.
RAW_NORM = 10.0

# The canary kinds each privacy mode can be audited with (the first is the headline).
KINDS = {"none": ("gradient", "input", "client"), "sample": ("gradient", "input"),
         "client": ("client",), "local": ("release",)}
# What an audit runs when no kinds are named. Without DP not the canary clients: 500 of them
# averaged in with a few real clients would drown the other kinds' signal (ask for them alone).
DEFAULT_KINDS = {**KINDS, "none": ("gradient", "input")}
LABELS = {"gradient": "gradient (white-box, site 0)",
          "input": "input (secret strings, site 0)",
          "client": "client (canary clients)",
          "release": "release (canary releases, site 0)"}


def run_audit(config: RunConfig, out: Path, canaries: int = 1000, progress=None,
              overwrite: bool = False, kinds: Sequence[str] | None = None) -> dict:
    """Train once with ``canaries`` canaries of each kind in ``kinds`` (default: every kind the
    privacy mode has by default, ``DEFAULT_KINDS``); write ``out/audit.json`` and ``out/audit.png``; return the
    result: the headline kind's numbers at the top level, every kind's under ``"kinds"``."""
    mode = config.privacy.mode
    kinds = tuple(kinds or DEFAULT_KINDS[mode])
    wrong = [k for k in kinds if k not in KINDS[mode]]
    if wrong or not kinds:
        raise ConfigError(f"privlora audit: canary kind(s) {', '.join(wrong) or '(none)'} do not "
                          f"apply to privacy.mode = {mode!r}; it takes {', '.join(KINDS[mode])}")
    if canaries < 10:
        raise ConfigError(f"--canaries {canaries}: use at least 10 (the bound grows with them)")
    check_target(out, overwrite)
    started = time.time()
    sim = simulation.prepare(config)  # an overspending plan refuses here
    trained = trained_parameters(sim.handles, sim.server.rule.trains_a)
    shapes = {name: p.shape for name, p in trained.items()}
    clip, seed = config.privacy.clip, config.seed

    def directions(kind: str, norm: float) -> dict[str, torch.Tensor]:
        return random_directions(shapes, canaries, norm,
                                 seeded_generator(seed, "audit", kind, "directions"))

    site = sim.sites[SITE]
    spec, examples = site.spec, list(site.examples)
    made: dict[str, Any] = {}
    if "gradient" in kinds:
        made["gradient"] = GradientCanaries(directions("gradient", clip),
                                            _coin_flips(config, canaries, "gradient"))
        spec = dataclasses.replace(spec, canaries=made["gradient"])
    if "input" in kinds:
        made["input"] = InputCanaries(secret_examples(sim, canaries),
                                      _coin_flips(config, canaries, "input"))
        examples += made["input"].joining()
        made["input"].base = _losses(sim, sim.init, made["input"].examples)
    if "release" in kinds:
        made["release"] = ReleaseCanaries(directions("release", RAW_NORM * clip),
                                          _coin_flips(config, canaries, "release"))
        spec = dataclasses.replace(spec, release_canaries=made["release"])
    if "client" in kinds:
        made["client"] = ClientCanaries(directions("client", RAW_NORM * clip),
                                        _coin_flips(config, canaries, "client"))
        plan = sim.server.plan
        rate = getattr(plan, "sample_rate", 1.0) if mode == "client" else 1.0
        sim.server = dataclasses.replace(sim.server, rule=WithCanaryClients(
            sim.server.rule, made["client"], rate, bool(getattr(plan, "secure", False)),
            seeded_generator(seed, "audit", "client", "sampling")))
    sim.sites[SITE] = dataclasses.replace(site, examples=examples, spec=spec)
    with tempfile.TemporaryDirectory(prefix="privlora-audit-") as tmp:
        run = Path(tmp) / "run"
        sim = simulation.with_site_budgets(sim, run)
        summary = rounds.run_rounds(sim, simulation.InProcess(sim, progress), run, progress)
        final = last_checkpoint(run)
        assert final is not None
    start = flatten(sim.init)
    change = {name: final.tensors[name] - start[name] for name in trained}
    privacy = summary["privacy"]
    delta = config.privacy.delta
    found = []
    for kind in kinds:
        canary = made[kind]
        if kind == "input":
            scores = canary.scores(_losses(sim, unflatten(final.tensors), canary.examples))
        elif kind == "release":
            scores = canary.scores()
        else:
            scores = canary.scores(change)
        found.append(_bound(kind, scores, canary.included, delta))
    result = {
        "mode": mode, **_public(found[0]),
        "epsilon_accountant": math.inf if privacy is None else privacy["epsilon_spent_pld"],
        "delta": delta, "confidence": CONFIDENCE,
        "noise_source": None if privacy is None else privacy["noise_source"],
        "final_accuracy": summary["final"]["accuracy"], "seconds": round(time.time() - started, 1),
        "kinds": [_public(f) for f in found],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "audit.json", json.dumps(result, indent=2, default=str))
    _plot(found, result, out / "audit.png")
    return result


def _bound(kind: str, scores: list[float], included: tuple[bool, ...], delta: float) -> dict:
    bound = audit_bound(scores, included, delta, CONFIDENCE)
    return {"canary_kind": LABELS[kind], "kind": kind, "epsilon_lower_bound": bound.epsilon,
            "canaries": len(scores), "included": sum(included), "guesses": bound.guesses,
            "correct": bound.correct, "guess_counts_scanned": bound.scanned,
            "auc": roc_auc(scores, included), "scores": scores, "in": included}


def _public(found: dict) -> dict:
    """A kind's result without its per-canary scores and coin flips (the plot shows them)."""
    return {k: v for k, v in found.items() if k not in ("scores", "in")}


@dataclass
class InputCanaries:
    """Input-space canaries: extra examples at site 0 (the included ones join its data)."""

    examples: list[Example]
    included: tuple[bool, ...]
    base: list[float] = dataclasses.field(default_factory=list)  # losses before training

    def joining(self) -> list[Example]:
        return [e for e, inside in zip(self.examples, self.included) if inside]

    def scores(self, trained: list[float]) -> list[float]:
        """The drop of each canary's loss from the base model to the trained one."""
        return [b - t for b, t in zip(self.base, trained)]


def secret_examples(sim: simulation.Simulation, m: int) -> list[Example]:
    """Return ``m`` canary examples: a random secret string of eight five-letter words each,
    with a random label of the task (classification) or a random secret answer (generation)."""
    task, generator = sim.server.task, seeded_generator(sim.config.seed, "audit", "input", "text")

    def secret(words: int) -> str:
        letters = torch.randint(26, (words, 5), generator=generator).tolist()
        return " ".join("".join(string.ascii_lowercase[c] for c in word) for word in letters)

    if task.classifies:
        labels = torch.randint(len(task.labels), (m,), generator=generator).tolist()
        rows = [{"text": secret(8), "label": task.labels[k]} for k in labels]
    else:
        rows = [{"question": secret(8), "answer": secret(3)} for _ in range(m)]
    return data.tokenize(rows, task, sim.tokenizer, sim.config.data.max_length)


def _losses(sim: simulation.Simulation, adapter: Adapter, examples: list[Example]) -> list[float]:
    """Return each example's training loss (the site's loss: label-only where it trains so)
    under ``adapter`` on the clients' model."""
    handles, labels = sim.handles, sim.sites[SITE].spec.label_tokens
    write_adapter(handles, adapter)
    handles.model.eval()
    device, pad = device_of(handles.model), sim.tokenizer.pad_token_id
    losses: list[float] = []
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            batch = collate(examples[start:start + 32], pad).to(device)
            losses += per_example_loss(handles.model, batch, labels).double().tolist()
    return losses


@dataclass(frozen=True)
class WithCanaryClients:
    """The server's rule with canary clients added to every round's updates: each included
    canary joins with the real clients' sampling rate (Poisson; every round without DP) and is
    clipped and noised with them by the plan's mechanism. Anything else is the rule's own."""

    rule: Any
    canaries: ClientCanaries
    rate: float
    secure: bool
    generator: torch.Generator

    def __getattr__(self, name: str):
        return getattr(self.rule, name)

    def aggregate(self, global_adapter, deltas, weights):
        """Without DP: the rule's weighted aggregate, canaries weighing as an average client."""
        extra = self._round_canaries()
        weight = sum(weights) / len(weights) if weights else 1.0
        return self.rule.aggregate(global_adapter, [*deltas, *extra],
                                   [*weights, *[weight] * len(extra)])

    def contributions(self, global_adapter, deltas):
        """Under client DP (``WithCentralDP`` wraps this): the canaries are clipped and noised
        with the real clients."""
        return self.rule.contributions(global_adapter, [*deltas, *self._round_canaries()])

    def _round_canaries(self) -> list:
        """This round's sampled canaries' updates (one draw per round: a round calls either
        ``aggregate`` or ``contributions``)."""
        ids = [i for i, inside in enumerate(self.canaries.included) if inside]
        draws = uniform(len(ids), self.generator, secure=self.secure)
        return self.canaries.updates([i for i, x in zip(ids, draws.tolist()) if x < self.rate])


def _coin_flips(config: RunConfig, m: int, kind: str) -> tuple[bool, ...]:
    """Include each canary with probability 1/2: from the OS CSPRNG, or seeded with
    privacy.reproducible_noise (the audit then replays)."""
    if config.privacy.reproducible_noise:
        draws = torch.rand(m, generator=seeded_generator(config.seed, "audit", kind, "included"),
                           dtype=torch.float64)
    else:
        draws = secure_uniform(m)
    return tuple(bool(x) for x in (draws < 0.5).tolist())


def _plot(found: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(found) + 1, figsize=(4.5 * len(found) + 3, 4),
                             gridspec_kw={"width_ratios": [3] * len(found) + [2]})
    for hist, f in zip(axes, found):
        scores, included = f["scores"], f["in"]
        hist.hist([s for s, x in zip(scores, included) if x], bins=40, alpha=0.6,
                  label="included")
        hist.hist([s for s, x in zip(scores, included) if not x], bins=40, alpha=0.6,
                  label="excluded")
        hist.set_xlabel(f"{f['kind']} canary score")
        hist.set_ylabel("canaries")
        hist.legend()
        hist.set_title(f"{f['canary_kind']}\n{f['canaries']} canaries, AUC {f['auc']:.3f}",
                       fontsize=9)
    bars, accountant = axes[-1], result["epsilon_accountant"]
    shown = accountant if math.isfinite(accountant) else 0.0
    bars.bar([f["kind"] for f in found] + ["accountant"],
             [f["epsilon_lower_bound"] for f in found] + [shown],
             color=["tab:red"] * len(found) + ["tab:gray"])
    bars.set_title("epsilon lower bounds (95%)" +
                   ("" if math.isfinite(accountant) else "\n(no DP: accountant inf)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
