"""``privlora audit``: one federated training run with canaries, and the empirical lower bound on
epsilon it gives, beside the accountant's epsilon (Steinke, Nasr & Jagielski 2023).

Sample mode (and no DP, to show the audit can see memorisation at all): white-box gradient
canaries at site 0 (``privacy.audit.GradientCanaries``), each included with probability 1/2,
scored by the inner product of the final adapter's change with its direction. The audit's run is
a normal run of the config plus the canaries, written to a temporary directory that is deleted:
nothing with canaries is ever kept, and no config can ask for canaries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from privlora import server
from privlora.config import RunConfig
from privlora.errors import ConfigError
from privlora.lora import flatten, trained_parameters
from privlora.privacy.audit import (
    GradientCanaries,
    audit_bound,
    random_directions,
    roc_auc,
)
from privlora.privacy.mechanisms import secure_uniform, seeded_generator
from privlora.run_dir import atomic_write, check_target, last_checkpoint

CONFIDENCE = 0.95
SITE = 0  # the site that holds the canaries


def run_audit(config: RunConfig, out: Path, canaries: int = 1000, progress=None,
              overwrite: bool = False) -> dict:
    """Train once with ``canaries`` white-box canaries at site 0; write ``out/audit.json`` and
    ``out/audit.png``; return the result."""
    mode = config.privacy.mode
    if mode not in ("sample", "none"):
        raise ConfigError(f"privlora audit: privacy.mode = {mode!r} has no canaries yet; audit "
                          "a run of privacy.mode = 'sample' (or 'none')")
    if canaries < 10:
        raise ConfigError(f"--canaries {canaries}: use at least 10 (the bound grows with them)")
    check_target(out, overwrite)
    started = time.time()
    sim = server.prepare(config)  # an overspending plan refuses here
    names = trained_parameters(sim.handles, sim.server.rule.trains_a)
    shapes = {name: p.shape for name, p in names.items()}
    generator = seeded_generator(config.seed, "audit", "directions")
    directions = random_directions(shapes, canaries, config.privacy.clip, generator)
    included = _coin_flips(config, canaries)
    site = sim.sites[SITE]
    sim.sites[SITE] = dataclasses.replace(site, spec=dataclasses.replace(
        site.spec, canaries=GradientCanaries(directions, included)))
    with tempfile.TemporaryDirectory(prefix="privlora-audit-") as tmp:
        run = Path(tmp) / "run"
        sim = server.with_site_budgets(sim, run)
        summary = server.run_rounds(sim, server.InProcess(sim, progress), run, progress)
        final = last_checkpoint(run)
        assert final is not None
        start = flatten(sim.init)
        change = {name: final.tensors[name] - start[name] for name in names}
    scores = GradientCanaries(directions, included).scores(change)
    privacy = summary["privacy"]
    delta = config.privacy.delta
    bound = audit_bound(scores, included, delta, CONFIDENCE)
    result = {
        "mode": mode, "canary_kind": "gradient (white-box, site 0)",
        "epsilon_lower_bound": bound.epsilon,
        "epsilon_accountant": math.inf if privacy is None else privacy["epsilon_spent_pld"],
        "delta": delta, "confidence": CONFIDENCE, "canaries": canaries,
        "included": sum(included), "guesses": bound.guesses, "correct": bound.correct,
        "guess_counts_scanned": bound.scanned, "auc": roc_auc(scores, included),
        "noise_source": None if privacy is None else privacy["noise_source"],
        "final_accuracy": summary["final"]["accuracy"], "seconds": round(time.time() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "audit.json", json.dumps(result, indent=2, default=str))
    _plot(scores, included, result, out / "audit.png")
    return result


def _coin_flips(config: RunConfig, m: int) -> tuple[bool, ...]:
    """Include each canary with probability 1/2: from the OS CSPRNG, or seeded with
    privacy.reproducible_noise (the audit then replays)."""
    if config.privacy.reproducible_noise:
        draws = torch.rand(m, generator=seeded_generator(config.seed, "audit", "included"),
                           dtype=torch.float64)
    else:
        draws = secure_uniform(m)
    return tuple(bool(x) for x in (draws < 0.5).tolist())


def _plot(scores: list[float], included: tuple[bool, ...], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (hist, bars) = plt.subplots(1, 2, figsize=(10, 4),
                                     gridspec_kw={"width_ratios": [3, 1]})
    hist.hist([s for s, x in zip(scores, included) if x], bins=40, alpha=0.6, label="included")
    hist.hist([s for s, x in zip(scores, included) if not x], bins=40, alpha=0.6,
              label="excluded")
    hist.set_xlabel("canary score (-(final adapter change . canary direction))")
    hist.set_ylabel("canaries")
    hist.legend()
    hist.set_title(f"{result['canaries']} canaries, AUC {result['auc']:.3f}")
    accountant = result["epsilon_accountant"]
    shown = accountant if math.isfinite(accountant) else 0.0
    bars.bar(["lower bound", "accountant"], [result["epsilon_lower_bound"], shown],
             color=["tab:red", "tab:gray"])
    bars.set_title("epsilon" + ("" if math.isfinite(accountant) else " (no DP: accountant inf)"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
