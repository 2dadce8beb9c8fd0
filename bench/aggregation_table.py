"""Aggregation rules side by side: fedavg vs ffa vs exact, without DP and at epsilon = 2.

Tasks: the built-in task and Financial PhraseBank (../shared/data, all-agree subset).
Usage: .venv/bin/python bench/aggregation_table.py [--rounds 4 --local-steps 10] [--resume]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import (
    RESULTS,
    budget_overrides,
    eps,
    load,
    majority_accuracy,
    pct,
    run_variant,
    runs_parser,
    save,
    table,
)

FPB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "financial_phrasebank" \
    / "fpb_sentences_allagree.jsonl"


def main() -> None:
    parser = runs_parser("aggregation_table")
    parser.add_argument("--privacy", default="sample", choices=["sample", "client", "local"])
    parser.add_argument("--tasks", default="builtin,fpb")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in the JSON (same settings) and run the rest")
    args = parser.parse_args()
    if args.report:
        print_table(load("aggregation_table")["rows"])
        return
    base = budget_overrides(args)
    tasks = {"builtin": "builtin", "fpb": str(FPB.resolve())}
    rows = finished_rows(args) if args.resume else []
    done = {(r["task"], r["rule"], r["target_epsilon"]) for r in rows}
    # Non-private cells first (both tasks), then the DP cells: the most informative cells land
    # first, and the JSON is rewritten after every cell.
    cells = [(task, rule, target) for target in (None, 2.0)
             for task in args.tasks.split(",") for rule in ("fedavg", "ffa", "exact")]
    for task, rule, target in cells:
        if (task, rule, target) in done:
            continue
        extra = [f"data.path=\"{tasks[task]}\"", f"federation.aggregation={rule}"]
        if target is not None:
            extra += [f"privacy.mode={args.privacy}", f"privacy.target_epsilon={target}"]
        out = RESULTS / "runs" / f"agg_{task}_{rule}_{target or 'inf'}"
        result = run_variant(base + extra, out)
        rows.append({"task": task, "rule": rule, "target_epsilon": target, **result})
        print(f"{task} {rule} eps={target}: acc {pct(result['accuracy'])}", flush=True)
        save("aggregation_table", {"args": vars(args), "rows": rows})  # after every cell
    print_table(rows)


def finished_rows(args: argparse.Namespace) -> list[dict]:
    """Cells saved by an earlier run with the same settings, for --resume."""
    if not (RESULTS / "aggregation_table.json").exists():
        return []
    saved = load("aggregation_table")
    settings = ("rounds", "local_steps", "max_eval", "privacy")
    if any(saved["args"].get(k) != getattr(args, k) for k in settings):
        raise SystemExit(f"bench/results/aggregation_table.json was measured with other settings "
                         f"({saved['args']}); rerun without --resume to start over")
    return saved["rows"]


def print_table(rows: list[dict]) -> None:
    """Print the cells measured so far as a Markdown table: no DP first, then task, then rule."""
    rules, tasks = ["fedavg", "ffa", "exact"], ["builtin", "fpb"]
    rows = sorted(rows, key=lambda r: (r["target_epsilon"] is not None, tasks.index(r["task"]),
                                       rules.index(r["rule"])))
    print(table(["task", "rule", "epsilon", "majority class", "zero-shot acc", "final acc",
                 "bytes up / round", "bytes down / round", "full FT bytes / round"],
                [[r["task"], r["rule"], eps(r["epsilon_pld"]), pct(majority_accuracy(r)),
                  pct(r["zero_shot_accuracy"]), pct(r["accuracy"]),
                  f"{r['bytes_up_per_round']:,.0f}",
                  f"{r['bytes_down_per_round']:,.0f}",
                  f"{r['full_finetune_bytes_per_round']:,.0f}"] for r in rows]))


if __name__ == "__main__":
    main()
