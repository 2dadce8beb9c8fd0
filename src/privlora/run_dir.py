"""The run directory, the user-visible contract of a run.

``config.toml``, ``metrics.jsonl`` (one line per round), ``summary.json``, ``ledger.json``,
``adapter/`` (stock PEFT format), ``checkpoints/round_NNN/``, ``report.png``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from privlora.config import RunConfig, to_toml
from privlora.evaluate import EvalResult, majority_share
from privlora.lora import Adapter, flatten, save_peft

if TYPE_CHECKING:
    from privlora.privacy.ledger import PrivacyLedger
    from privlora.server import Federation

_PACKAGES = ("privlora", "torch", "transformers", "peft", "dp-accounting", "flwr", "safetensors")


def _json_default(value):
    return str(value)


def _finite(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else str(x)


@dataclass(frozen=True)
class Traffic:
    """Bytes one client moved in one round, as serialized."""

    up: int
    down: int


@dataclass
class RunDir:
    """Writes a run's files; holds the per-round rows for the final summary and plot."""

    path: Path
    rows: list[dict]

    @classmethod
    def create(cls, path: Path, config: RunConfig, fed: Federation) -> RunDir:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.toml").write_text(to_toml(config))
        (path / "metrics.jsonl").write_text("")
        return cls(path, [])

    def log_round(self, round_: int, result: EvalResult, updates: list,
                  traffic: dict[int, Traffic], seconds: float, ledger: PrivacyLedger | None, fed: Federation,
                  diagnostics: dict[str, float]) -> dict:
        """Append one line to metrics.jsonl (and keep it for the summary).

        Under client-level DP, who took part is what Poisson sampling hides, so every field that
        depends on it (the clients, byte totals and per-client means, the round's seconds) is
        written as null; the summary reports expected totals from data-independent payload sizes.
        """
        hide = fed.plan is not None and fed.plan.mode == "client"
        up = sum(t.up for t in traffic.values())
        down = sum(t.down for t in traffic.values())
        per_up = None if hide or not traffic else up / len(traffic)
        row = {
            "round": round_,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "perplexity": result.perplexity,
            "clients": None if hide else [u.client_id for u in updates],
            "bytes_up": None if hide else up,
            "bytes_down": None if hide else down,
            "bytes_up_per_client": per_up,
            "bytes_down_per_client": None if hide or not traffic else down / len(traffic),
            "bytes_by_client": None if hide else {str(c): asdict(t) for c, t in traffic.items()},
            "full_finetune_bytes_per_client": fed.full_model_bytes,
            "ratio_up_vs_full": None if per_up is None else per_up / fed.full_model_bytes,
            "seconds": None if hide else round(seconds, 3),
            "epsilon": _finite(ledger.epsilon(accountant=fed.plan.accountant)) if ledger else None,
            "aggregation": fed.config.federation.aggregation,
            "train_loss": (sum(u.metrics["train_loss"] for u in updates) / len(updates)
                           if updates and fed.plan is None else None),
        }
        if diagnostics:
            key = "svd_residual" if fed.config.federation.aggregation == "exact" else "factor_gap"
            row[f"{key}_max"] = max(diagnostics.values())
            row[f"{key}_mean"] = sum(diagnostics.values()) / len(diagnostics)
        with (self.path / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row, default=_json_default) + "\n")
        self.rows.append(row)
        return row

    def checkpoint(self, round_: int, fed: Federation, adapter: Adapter,
                   ledger: PrivacyLedger | None) -> None:
        """Save the global adapter (flat safetensors) and the ledger for this round."""
        folder = self.path / "checkpoints" / f"round_{round_:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in flatten(adapter).items()},
                  str(folder / "adapter.safetensors"))
        if ledger is not None:
            (folder / "ledger.json").write_text(json.dumps(ledger.to_dict(), indent=1))

    def finish(self, fed: Federation, adapter: Adapter, ledger: PrivacyLedger | None,
               zero_shot: EvalResult, final: EvalResult, wall: float) -> dict:
        """Save the adapter in PEFT format, the ledger, summary.json and report.png."""
        save_peft(fed.handles, adapter, self.path / "adapter")
        (self.path / "adapter" / "task.json").write_text(json.dumps(
            {"task": fed.task.name, "kind": fed.task.kind, "labels": list(fed.task.labels),
             "instruction": fed.task.instruction, "model": fed.config.model.name,
             "max_length": fed.config.data.max_length}, indent=1))
        if ledger is not None:
            (self.path / "ledger.json").write_text(json.dumps(ledger.to_dict(), indent=1))
        summary = self._summary(fed, ledger, zero_shot, final, wall)
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2,
                                                           default=_json_default))
        from privlora.report import plot_rounds

        plot_rounds(self.rows, self.path / "report.png", title=fed.task.name)
        return summary

    def _summary(self, fed: Federation, ledger: PrivacyLedger | None, zero_shot: EvalResult,
                 final: EvalResult, wall: float) -> dict:
        rounds = [r for r in self.rows if r["round"] > 0]
        plan = fed.plan
        if plan is not None and plan.mode == "client":  # participation is hidden: expected values
            participations = plan.sample_rate * fed.config.federation.num_clients * len(rounds)
            up = down = fed.mean_payload_bytes() * participations
        else:
            participations = sum(len(r["clients"]) for r in rounds)
            up = sum(r["bytes_up"] for r in rounds)
            down = sum(r["bytes_down"] for r in rounds)
        full = fed.full_model_bytes * participations
        privacy = None
        if fed.plan is not None and ledger is not None:
            privacy = {
                **asdict(fed.plan),
                "epsilon_planned": _finite(fed.plan.epsilon),
                "epsilon_spent_pld": _finite(ledger.epsilon(accountant="pld")),
                "epsilon_spent_rdp": _finite(ledger.epsilon(accountant="rdp")),
            }
        return {
            "task": fed.task.name,
            "labels": list(fed.task.labels),
            "model": fed.config.model.name,
            "majority_class_accuracy": majority_share([e.label for e in fed.eval_examples]),
            "zero_shot": asdict(zero_shot),
            "final": asdict(final),
            "rounds": fed.config.federation.rounds,
            "aggregation": fed.config.federation.aggregation,
            "privacy": privacy,
            "communication": {
                "bytes_up_total": up,
                "bytes_down_total": down,
                "client_participations": participations,
                "participations_are_expected_values": plan is not None and plan.mode == "client",
                "full_finetune_bytes_per_transfer": fed.full_model_bytes,
                "full_finetune_bytes_up_total": full,
                "full_finetune_bytes_down_total": full,
                "ratio_up_vs_full": up / full if full else None,
                "ratio_down_vs_full": down / full if full else None,
            },
            # under client DP the run's duration grows with how many clients took part
            "wall_seconds": None if plan is not None and plan.mode == "client" else round(wall, 1),
            "versions": {p: _version(p) for p in _PACKAGES},
        }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
