"""FPB: score saved `bench/utility.py --task fpb` runs on 1,189 harder sentences no run saw.

An accuracy there has a standard error of about 1.2 points (2 on a seed's 200 held-out
sentences), but the non-private gain is smaller there too (17 points against 29), so a share of
the gain is no more precise; what the set adds is a second, harder population.

    .venv/bin/python bench/fpb_unseen.py RUN_DIR [RUN_DIR ...]
    .venv/bin/python bench/fpb_unseen.py --report

A RUN_DIR is what `bench/utility.py --task fpb` wrote (bench/results/runs/utility_fpb/
<cell>-seed<N>); its final adapter (adapter/, loaded with stock PEFT as `privlora eval` does) is
scored on FPB's 75%-agreement sentences that are not in the all-agree file the runs split (the
annotators agreed less on them). They are the same sentences for every seed, so one floor, the
larger of the majority label and the untrained model, serves every row; each cell's share of the
gain is against the same seed's `nodp+auto` run. Rows go to bench/results/fpb_unseen.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import tempfile
from pathlib import Path

from _common import fpb_unseen_rows, pct, provenance, save, saved, table

from privlora.evaluate import majority_share

NAME = "fpb_unseen"
TWIN = "nodp+auto"


def run_name(run: Path) -> tuple[str, int]:
    """The cell and seed of a bench/utility.py run directory, ``<cell>-seed<N>``."""
    found = re.fullmatch(r"(.+)-seed(\d+)", run.name)
    if not found or not (run / "adapter" / "task.json").is_file():
        raise SystemExit(f"{run}: not a bench/utility.py run directory (<cell>-seed<N> with "
                         "adapter/task.json); give bench/results/runs/utility_fpb/<cell>-seed<N>")
    return found.group(1), int(found.group(2))


def zero_shot(run: Path, rows: list[dict]) -> float:
    """The untrained base model's accuracy on ``rows``, with the run's prompt, labels and dtype."""
    from privlora import data
    from privlora.config import load_config
    from privlora.evaluate import evaluate
    from privlora.models import load_model, load_tokenizer

    meta = json.loads((run / "adapter" / "task.json").read_text())
    task = dataclasses.replace(data.task_from_meta(meta), rows=tuple(rows))
    config = load_config(run / "config.toml")
    tokenizer = load_tokenizer(meta["model"])
    base = load_model(meta["model"], config.model.dtype, config.model.device)
    examples = data.tokenize(rows, task, tokenizer, meta["max_length"])
    return evaluate(base, examples, task, tokenizer).accuracy


def measure(run: Path, rows_file: Path) -> dict:
    from privlora.evaluate_adapter import evaluate_adapter

    cell, seed = run_name(run)
    result = evaluate_adapter(run / "adapter", str(rows_file), None)
    held_out = json.loads((run / "summary.json").read_text())["final"]["accuracy"]
    return {"cell": cell, "seed": seed, "accuracy": result["accuracy"],
            "macro_f1": result["macro_f1"], "examples": result["examples"],
            "held_out_accuracy": held_out, "run_dir": str(run), "commit": provenance()["commit"]}


def render(rows: list[dict], floor: dict) -> str:
    """One line per run: accuracy on the unseen sentences, its standard error, and the share of
    the same seed's non-private gain, on these sentences and on the run's own 200."""
    twins = {r["seed"]: r for r in rows if r["cell"] == TWIN}
    lines = []
    for r in sorted(rows, key=lambda r: (r["cell"] != TWIN, r["cell"], r["seed"])):
        p, n = r["accuracy"], r["examples"]
        twin = twins.get(r["seed"])
        kept = "-" if twin is None else pct((p - floor["floor"]) /
                                            (twin["accuracy"] - floor["floor"]))
        lines.append([r["cell"], r["seed"], pct(p), f"{100 * math.sqrt(p * (1 - p) / n):.1f}",
                      kept, pct(r["held_out_accuracy"]), pct(r["macro_f1"])])
    head = (f"{floor['examples']:,} unseen sentences: majority {pct(floor['majority'])}, "
            f"zero-shot {pct(floor['zero_shot'])}; floor {pct(floor['floor'])}\n\n")
    return head + table(["cell", "seed", "accuracy (unseen)", "SE (points)",
                         f"gain kept (of the seed's {TWIN})", "accuracy (the run's 200)",
                         "macro-F1 (unseen)"], lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="bench/utility.py FPB run directories")
    parser.add_argument("--report", action="store_true", help="only print the table")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if not args.report and not args.runs:
        parser.error("give run directories to score, or --report")
    rows = saved(NAME, "rows", [])
    floor = saved(NAME, "floor", None)
    if not args.report:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        unseen = fpb_unseen_rows()
        with tempfile.TemporaryDirectory() as tmp:
            rows_file = Path(tmp) / "unseen.jsonl"
            rows_file.write_text("".join(json.dumps(r) + "\n" for r in unseen))
            if floor is None:
                majority = majority_share([r["label"] for r in unseen])
                zs = zero_shot(args.runs[0], unseen)
                floor = {"examples": len(unseen), "majority": majority, "zero_shot": zs,
                         "floor": max(majority, zs)}
            for run in args.runs:
                row = measure(run, rows_file)
                rows = [r for r in rows if (r["cell"], r["seed"]) != (row["cell"], row["seed"])]
                rows.append(row)
                save(NAME, {"floor": floor, "rows": rows})
    if floor is None:
        raise SystemExit(f"nothing saved yet in bench/results/{NAME}.json: score some runs first")
    print(render(rows, floor))


if __name__ == "__main__":
    main()
