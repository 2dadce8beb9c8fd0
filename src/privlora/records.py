"""What a run publishes, as plain records: one row per round and the summary. Pure functions.

The privacy plan decides what is hidden: ``plan.redact`` nulls the fields of a round row that
depend on who took part (client mode) or on how long the realised batches took (every private
mode), and the summary reports expected communication when participation is hidden.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from privlora.evaluate import EvalResult, loss_drop
from privlora.privacy.plan import PrivacyPlan
from privlora.privacy.signal import NoiseToSignal

if TYPE_CHECKING:
    from privlora.config import QuantizationConfig
    from privlora.quantization.bundle import Manifest

_PACKAGES = ("privlora", "torch", "transformers", "peft", "dp-accounting", "flwr", "safetensors")


@dataclass(frozen=True)
class Traffic:
    """Bytes one client moved in one round, as serialized."""

    up: int
    down: int


def finite_or_text(x: float | None) -> float | str | None:
    """Return ``x``, or its text for inf/nan (strict JSON has neither)."""
    return x if x is None or math.isfinite(x) else str(x)


@dataclass(frozen=True)
class RoundRecord:
    """One round as the server saw it; ``published`` is its metrics.jsonl line, with the fields
    the privacy plan hides set to None.

    ``result`` is None in a round that was not evaluated (``federation.eval_every``).
    """

    round: int
    result: EvalResult | None
    traffic: Mapping[int, Traffic]  # by client id: who was sent the round, and the bytes moved
    rejected: Sequence[int]  # ids that sent nothing or a refused update
    train_losses: Sequence[float]  # the accepted clients' mean local losses
    seconds: float
    epsilon: float | None  # the run's spend so far, by the plan's accountant
    rule: str  # federation.aggregation
    diagnostic: str | None  # the rule's per-layer quantity: ``<diagnostic>_max/_mean``
    diagnostics: Mapping[str, float]
    full_model_bytes: int  # what one full fine-tuning transfer would move
    model_privacy: Mapping[str, Any] | None = None  # FedLPP scores (public and held-out text)
    update_agreement: float | None = None  # the global update's agreement with the last one

    def published(self, plan: PrivacyPlan) -> dict[str, Any]:
        """Return the metrics.jsonl line."""
        result, traffic = self.result, self.traffic
        up = sum(t.up for t in traffic.values())
        down = sum(t.down for t in traffic.values())
        per_up = up / len(traffic) if traffic else None
        row: dict[str, Any] = {
            "round": self.round,
            "accuracy": None if result is None else result.accuracy,
            "macro_f1": None if result is None else result.macro_f1,
            "loss": None if result is None else result.loss,
            "loss_se": None if result is None else result.loss_se,
            "perplexity": None if result is None else result.perplexity,
            "label_loss": None if result is None else result.label_loss,
            "clients": sorted(traffic),
            "rejected": list(self.rejected),
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_per_client": per_up,
            "bytes_down_per_client": down / len(traffic) if traffic else None,
            "bytes_by_client": {str(c): asdict(t) for c, t in traffic.items()},
            "full_finetune_bytes_per_client": self.full_model_bytes,
            "ratio_up_vs_full": None if per_up is None else per_up / self.full_model_bytes,
            "seconds": round(self.seconds, 3),
            "epsilon": finite_or_text(self.epsilon),
            "noise_source": plan.noise_source,
            "aggregation": self.rule,
            "train_loss": (sum(self.train_losses) / len(self.train_losses)
                           if self.train_losses else None),
        }
        if self.diagnostics and self.diagnostic is not None:
            row[f"{self.diagnostic}_max"] = max(self.diagnostics.values())
            row[f"{self.diagnostic}_mean"] = sum(self.diagnostics.values()) / len(self.diagnostics)
        row = plan.redact(row)
        if self.model_privacy is not None:  # scores of public and held-out text: nothing per client
            row["model_privacy"] = dict(self.model_privacy)
        row["update_agreement"] = self.update_agreement
        return row


def communication(rows: Sequence[Mapping[str, Any]], plan: PrivacyPlan, rounds: int,
                  num_clients: int, per_round: int, expected_up_bytes: float,
                  expected_down_bytes: float, full_model_bytes: int,
                  bundle_bytes: int | None = None) -> dict[str, Any]:
    """Return the run's communication totals against full fine-tuning.

    When the plan hides participation the totals are expected values: q * N * rounds transfers
    of the mean payload sizes, which depend on shapes only. A FedLPP base-model bundle is sent
    once to every client, before the first round.
    """
    trained = [r for r in rows if r["round"] > 0]
    if plan.hides_participation:
        participations = plan.expected_participants(num_clients, per_round) * rounds
        up = expected_up_bytes * participations
        down = expected_down_bytes * participations
    else:
        participations = sum(len(r["clients"]) for r in trained)
        up = sum(r["bytes_up"] for r in trained)
        down = sum(r["bytes_down"] for r in trained)
    full = full_model_bytes * participations
    return {
        "bytes_up_total": up,
        "bytes_down_total": down,
        "client_participations": participations,
        "participations_are_expected_values": plan.hides_participation,
        "full_finetune_bytes_per_transfer": full_model_bytes,
        "full_finetune_bytes_up_total": full,
        "full_finetune_bytes_down_total": full,
        "ratio_up_vs_full": up / full if full else None,
        "ratio_down_vs_full": down / full if full else None,
        "bundle_bytes_per_client": bundle_bytes,
        "bundle_bytes_down_total": None if bundle_bytes is None else bundle_bytes * num_clients,
    }


def model_privacy_summary(quantization: QuantizationConfig, bundle: Manifest | None,
                          first: Mapping[str, Any],
                          last: Mapping[str, Any]) -> dict[str, Any]:
    """Return summary.json's FedLPP report from the first and last evaluated rounds.

    ``first`` (before training, a zero adapter) gives the server's base and the base a client
    holds (the quantized base alone when there is a bundle); ``last`` the central model (the
    server's base + adapter, or with ``transfer = "logits"`` the adapter's offset, and then the
    adapter on the server's base too) against the client-visible one (the client's base + the
    adapter as sent).
    """
    central, visible = last["central"], last["client_visible"]
    ratio = None
    if central["general_perplexity"] and visible["general_perplexity"]:
        ratio = visible["general_perplexity"] / central["general_perplexity"]
    report: dict[str, Any] = {
        "base_scheme": quantization.base,
        "adapter_scheme": quantization.adapter,
        "uplink_bits": quantization.uplink_bits,
        "base_noise": quantization.base_noise,
        "transfer": quantization.transfer,
        "general_text": quantization.general_text or None,
        "server_base": first["central"],
        "client_base": first["client_visible"],
        "central": central,
        "client_visible": visible,
        "accuracy_gap": _gap(central["accuracy"], visible["accuracy"]),
        "general_perplexity_ratio": ratio,
    }
    if "adapter_on_server_base" in last:  # transfer = "logits": the adapter itself, beside it
        report["adapter_on_server_base"] = last["adapter_on_server_base"]
    if bundle is not None:
        quantized = [t for t in bundle.tensors if t.type != "F32"]
        exact = [t for t in quantized if t.identical]
        report |= {
            "bundle_bytes": bundle.total_bytes,
            "bundle_weights_bytes": bundle.model_bytes,
            "full_precision_bytes": bundle.full_precision_bytes,
            "bundle_vs_full_precision": bundle.model_bytes / bundle.full_precision_bytes,
            "tensor_types": dict(sorted(Counter(t.type for t in bundle.tensors).items())),
            # quantized tensors whose values a client holds exactly (the server's weights already
            # lay on the scheme's grid): the bundle hides nothing of these
            "quantized_tensors_identical": len(exact),
            "quantized_weights_identical_share": sum(math.prod(t.shape) for t in exact)
            / max(1, sum(math.prod(t.shape) for t in quantized)),
        }
    return report


def _gap(central: float | None, visible: float | None) -> float | None:
    return None if central is None or visible is None else central - visible


def privacy_summary(plan: PrivacyPlan, spent_pld: float, spent_rdp: float,
                    signal: NoiseToSignal | None = None) -> dict | None:
    """Return the plan, what was spent and the noise-to-signal prediction, or None without DP."""
    planned = plan.to_dict()
    if planned is None:
        return None
    return {**planned, "epsilon_planned": finite_or_text(planned["epsilon_planned"]),
            "epsilon_spent_pld": finite_or_text(spent_pld),
            "epsilon_spent_rdp": finite_or_text(spent_rdp),
            "noise_to_signal": None if signal is None else signal_dict(signal)}


def signal_dict(signal: NoiseToSignal) -> dict[str, Any]:
    """Return the prediction as plain fields (summary.json, `privacy plan --json`)."""
    return {**asdict(signal), "verdict": signal.verdict, "fixes": signal.fixes()}


@dataclass(frozen=True)
class Summary:
    """What a run reports at its end; ``published`` is summary.json."""

    task: str
    labels: Sequence[str]
    model: str
    majority: float | None  # the share of the eval set's most common label (classification)
    zero_shot: EvalResult
    final: EvalResult
    rounds: int  # rounds run: below federation.rounds when stopped on noise
    rule: str
    privacy: Mapping[str, Any] | None  # ``privacy_summary`` (None without DP)
    communication: Mapping[str, Any]  # ``communication``
    wall_seconds: float | None  # None when the duration would depend on private batch sizes
    trained_loss: str = "answer"  # train.loss: "answer" or "label" (which eval loss fell)
    rounds_planned: int | None = None  # federation.rounds, when federation.stop_on_noise is on
    model_privacy: Mapping[str, Any] | None = None  # ``model_privacy_summary`` (FedLPP)
    model_dtype: str | None = None  # what the server's base computed in (model.dtype resolved)

    def published(self) -> dict[str, Any]:
        """Return summary.json: task, metrics before and after, privacy, communication,
        versions."""
        out = {
            "task": self.task,
            "labels": list(self.labels),
            "model": self.model,
            "model_dtype": self.model_dtype,
            "majority_class_accuracy": self.majority,
            "zero_shot": self.zero_shot.published(),
            "final": self.final.published(),
            # the fall in answer loss and its paired standard error (None after a resume from a
            # checkpoint written before per-example losses were kept)
            "loss_drop": dict(zip(("value", "se"), loss_drop(self.zero_shot, self.final),
                                  strict=True)),
            "trained_loss": self.trained_loss,
            "rounds": self.rounds,
            "aggregation": self.rule,
            "privacy": None if self.privacy is None else dict(self.privacy),
            "communication": dict(self.communication),
            "wall_seconds": None if self.wall_seconds is None else round(self.wall_seconds, 1),
            "versions": {p: _version(p) for p in _PACKAGES},
        }
        if self.rounds_planned is not None:  # federation.stop_on_noise
            out["stopped_on_noise"] = self.rounds < self.rounds_planned
            out["rounds_planned"] = self.rounds_planned
        if self.model_privacy is not None:
            out["model_privacy"] = dict(self.model_privacy)
        return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
