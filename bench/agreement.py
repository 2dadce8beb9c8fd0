"""Does the released updates' agreement tell a learning private run from one that is not?

Reads finished run directories (bench/utility.py writes them under
bench/results/runs/utility_<task>/<cell>-seed<N>/) and tabulates, for each private run, each
round's ``update_agreement`` (cos of consecutive global updates x sqrt(d); about N(0, 1) for pure
noise) beside whether the run learned: its final accuracy above the floor (the larger of
zero-shot and the majority label) by more than two binomial standard errors.

    .venv/bin/python bench/agreement.py bench/results/runs/utility_*/*+auto*/

Writes bench/results/agreement.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import save, table

from privlora.evaluate import floor_margin


def learned(summary: dict) -> tuple[float, bool]:
    """The final accuracy's margin over the floor in standard errors, and whether it is > 2."""
    final, zero = summary["final"], summary["zero_shot"]
    floor = max(zero["accuracy"], summary["majority_class_accuracy"])
    margin = floor_margin(final["accuracy"], floor, final["examples"])
    return margin, margin > 2


def row(run: Path) -> dict | None:
    """One private classification run's agreements and outcome (None for any other run)."""
    summary_file = run / "summary.json"
    if not summary_file.is_file():
        return None  # unfinished
    summary = json.loads(summary_file.read_text())
    if summary["privacy"] is None or summary["final"]["accuracy"] is None:
        return None
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    margin, ok = learned(summary)
    return {"run": f"{run.parent.name}/{run.name}", "accuracy": summary["final"]["accuracy"],
            "margin": margin, "learned": ok,
            "agreement": [r["update_agreement"] for r in rounds
                          if r.get("update_agreement") is not None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    args = parser.parse_args()
    rows = [r for r in (row(run) for run in sorted(args.runs)) if r is not None]
    save("agreement", {"rows": rows})
    print(table(["run", "accuracy", "above floor (SE)", "learned", "update agreement by round"],
                [[r["run"], f"{100 * r['accuracy']:.1f}%", f"{r['margin']:.1f}",
                  "yes" if r["learned"] else "no", ", ".join(f"{a:.2f}" for a in r["agreement"])]
                 for r in rows]))
    for verdict in (True, False):
        values = [a for r in rows if r["learned"] is verdict for a in r["agreement"]]
        if values:
            first = [r["agreement"][0] for r in rows if r["learned"] is verdict and r["agreement"]]
            print(f"learned={verdict}: {len(first)} runs, agreement {min(values):.2f} to "
                  f"{max(values):.2f}; first value under 2 in {sum(a < 2 for a in first)}")


if __name__ == "__main__":
    main()
