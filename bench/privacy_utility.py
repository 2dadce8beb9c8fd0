"""Privacy/utility smoke table: accuracy at epsilon = inf, 8, 2 for each privacy mode.

Runs every cell on the built-in task (SmolLM2, 4 clients) one after another in one process.
Usage: .venv/bin/python bench/privacy_utility.py [--rounds 4 --local-steps 10] [--report]
"""

from __future__ import annotations

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


def main() -> None:
    args = runs_parser("privacy_utility").parse_args()
    if args.report:
        print_table(load("privacy_utility")["rows"])
        return
    base = budget_overrides(args)
    cells = [("none", None)] + [(m, e) for m in ("sample", "client", "local") for e in (8, 2)]
    rows = []
    for mode, target in cells:
        extra = [] if target is None else [f"privacy.mode={mode}", f"privacy.target_epsilon={target}"]
        out = RESULTS / "runs" / f"privacy_{mode}_{target or 'inf'}"
        result = run_variant(base + extra, Path(out))
        rows.append({"mode": mode, "target_epsilon": target, **result})
        print(f"{mode} eps={target}: acc {pct(result['accuracy'])}", flush=True)
    save("privacy_utility", {"args": vars(args), "rows": rows})
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Print the cells as a Markdown table."""
    print(table(["mode", "target epsilon", "epsilon spent (PLD / RDP)", "sigma",
                 "majority class", "zero-shot acc", "final acc"],
                [[r["mode"], eps(r["target_epsilon"]),
                  f"{eps(r['epsilon_pld'])} / {eps(r['epsilon_rdp'])}",
                  "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}",
                  pct(majority_accuracy(r)), pct(r["zero_shot_accuracy"]), pct(r["accuracy"])]
                 for r in rows]))


if __name__ == "__main__":
    main()
