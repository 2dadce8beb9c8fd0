"""Shared bits for benchmarks: write JSON under bench/results/ and print a table."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # beside the repository
FPB = DATA / "financial_phrasebank"


PACKAGES = ("torch", "transformers", "peft", "dp-accounting", "flwr", "gguf", "privlora")


def provenance() -> dict:
    """What a saved result was made with: the commit (and whether the tree had changes), the
    package versions and the machine."""
    import subprocess
    from importlib import metadata

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=RESULTS.parent, capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"commit": git("rev-parse", "HEAD") or None,
            "tree_changed": bool(git("status", "--porcelain", "--untracked-files=no")),
            "packages": versions, "python": platform.python_version()}


def save(name: str, payload: dict) -> Path:
    """Write ``payload`` (plus the commit, package versions, machine and date) to
    bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "machine": {"platform": platform.platform(),
                                      "processor": platform.processor(),
                                      "cpus": __import__("os").cpu_count()},
               "provenance": provenance(),
               "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def load(name: str) -> dict:
    """Read bench/results/<name>.json as ``save`` wrote it."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def saved(name: str, key: str, empty):
    """``load(name)[key]``, or ``empty`` while nothing is saved under ``name`` yet."""
    return load(name)[key] if (RESULTS / f"{name}.json").exists() else empty


def runs_parser(name: str) -> argparse.ArgumentParser:
    """Options every table of federated runs shares: the training budget, eval size, --report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--max-eval", type=int, default=100)
    parser.add_argument("--report", action="store_true",
                        help=f"only print the table from bench/results/{name}.json")
    return parser


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides for the budget options of ``runs_parser``."""
    return [f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}",
            f"data.max_eval={args.max_eval}"]


def table(headers: list[str], rows: list[list]) -> str:
    """Render a Markdown table (the README pastes these)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def with_sample_rate(overrides: list[str]) -> list[str]:
    """Add the sample rate ``privlora privacy plan`` suggests where sample mode lacks one.

    The benchmark holds every client's data, as ``privacy plan`` does; a run never derives the
    rate from sizes itself.
    """
    from privlora import data
    from privlora.config import load_config
    from privlora.privacy.plan import lacks_sample_rate, suggest_sample_rate

    config = load_config(None, overrides)
    if not lacks_sample_rate(config):
        return overrides
    task = data.load_task(config.data, config.seed)
    train, _ = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    parts = data.partition(train, config.data, config.federation.num_clients, config.seed)
    rate = suggest_sample_rate(config.train.batch_size, [len(p) for p in parts])
    return [*overrides, f"privacy.sample_rate={rate!r}"]


def run_variant(overrides: list[str], out: Path) -> dict:
    """Run one federated fine-tune in-process and return the numbers a table needs."""
    from privlora.config import load_config

    overrides = with_sample_rate(overrides)
    return {"overrides": overrides, **run_config(load_config(None, overrides), out)}


def run_config(config, out: Path) -> dict:
    """Run one federated fine-tune of ``config`` in-process; return the numbers a table needs."""
    from privlora.config import to_toml
    from privlora.simulation import run

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's warnings per cell
    started = time.time()
    summary = run(config, out, overwrite=True)
    return summary_row(summary, to_toml(config), time.time() - started, out)


def summary_row(summary: dict, config_toml: str, seconds: float | None, out: Path) -> dict:
    """The numbers a table needs from one run's summary.json."""
    rounds = summary["rounds"]
    privacy = summary["privacy"] or {}
    comm = summary["communication"]
    return {
        "config": config_toml,
        "majority_accuracy": summary["majority_class_accuracy"],
        "zero_shot_accuracy": summary["zero_shot"]["accuracy"],
        "accuracy": summary["final"]["accuracy"],
        "macro_f1": summary["final"].get("macro_f1"),
        "loss": summary["final"]["loss"],  # answer loss (generation tasks: the metric)
        "zero_shot_loss": summary["zero_shot"]["loss"],
        # standard errors over the eval examples (runs before they were recorded: None)
        "loss_se": summary["final"].get("loss_se"),
        "zero_shot_loss_se": summary["zero_shot"].get("loss_se"),
        "loss_drop_se": (summary.get("loss_drop") or {}).get("se"),  # paired, per example
        "perplexity": summary["final"]["perplexity"],
        "noise_to_signal": privacy.get("noise_to_signal"),
        "epsilon_pld": privacy.get("epsilon_spent_pld"),
        "epsilon_rdp": privacy.get("epsilon_spent_rdp"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "bytes_up_per_round": comm["bytes_up_total"] / rounds,
        "bytes_down_per_round": comm["bytes_down_total"] / rounds,
        "full_finetune_bytes_per_round": comm["full_finetune_bytes_up_total"] / rounds,
        "seconds": None if seconds is None else round(seconds, 1),
        "run_dir": str(out),
    }


def device_label(device: str, dtype: str = "auto") -> str:
    """Name what ``model.device`` and ``model.dtype`` resolve to here: the GPU's name, or the CPU
    and its cores, and the dtype the model computes in (a CPU without native bf16 runs "auto"
    in float32, several times slower than one with it, and not bit-identical)."""
    import os

    import torch

    from privlora.models import train_dtype

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"{torch.cuda.get_device_name(0)}, {train_dtype(dtype, torch.device('cuda'))}"
    return f"cpu ({os.cpu_count()} cores, {train_dtype(dtype, torch.device('cpu'))})"


def devices(group: list[dict]) -> str:
    """The devices a table cell's rows ran on, each once, in the rows' order."""
    return "; ".join(dict.fromkeys(r.get("device", "cpu") for r in group))


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def eps(x) -> str:
    return "inf" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))


def majority_accuracy(row: dict) -> float | None:
    """The row's always-the-most-common-label accuracy; recomputed from its overrides if absent.

    Rows measured before summaries carried it get it from the same seeded split of the same data.
    """
    if "majority_accuracy" in row:
        return row["majority_accuracy"]
    from privlora import data
    from privlora.config import load_config
    from privlora.evaluate import majority_share

    config = load_config(None, row["overrides"])
    task = data.load_task(config.data, config.seed)
    _, eval_rows = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    return majority_share([r.get("label") for r in eval_rows])


def fpb_unseen_rows() -> list[dict]:
    """FPB's 75%-agreement sentences that are not in the all-agree file (by text): 1,189 rows
    that no run on the all-agree file trains or evaluates on (annotators agreed less on them)."""
    from privlora.data import read_jsonl

    seen = {r["text"] for r in read_jsonl(FPB / "fpb_sentences_allagree.jsonl")}
    return [r for r in read_jsonl(FPB / "fpb_sentences_75agree.jsonl") if r["text"] not in seen]
