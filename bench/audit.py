"""The one-run privacy audit as a table: empirical epsilon lower bound against the accountant's.

Each cell is one `privlora audit` run (privlora.audit.run_audit: one federated training run of
the task's recipe with the mode's canaries, each included with probability 1/2) of
bench/utility.py's cells. nodp and sample-E carry white-box gradient and input-space canaries at
site 0 in the same run; client-E carries canary clients; local-E canary releases at site 0.

    .venv/bin/python bench/audit.py --task builtin [--cells nodp,sample-8,...] [--canaries 1000]
    .venv/bin/python bench/audit.py --task sst2
    .venv/bin/python bench/audit.py --task builtin --quick     # tiny random model: a smoke run
    .venv/bin/python bench/audit.py --task builtin --report    # the table from the JSON

Rows (one per cell and canary kind) accumulate in bench/results/audit_<task>.json (a rerun of a
cell replaces its rows). Tightness = lower bound / accountant epsilon: 1 would mean the
accountant is exact for this attack. "ideal (Gaussian)" is what the one-run method would certify,
in expectation, for a perfect attack on an exact Gaussian mechanism at the accountant's epsilon
with as many canaries (privacy.audit.ideal_gaussian_bound): the most this method can show.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from _common import save, saved, table
from utility import RECIPE, cell_config

CELLS = "nodp,sample-8,sample-2,client-8,client-2"


def _rows(task: str, cell: str, result: dict) -> list[dict]:
    """One row per canary kind of one audit."""
    from privlora.privacy.audit import ideal_gaussian_bound

    acc = result["epsilon_accountant"]
    shared = {k: v for k, v in result.items() if k != "kinds"}
    return [{**shared, **found, "task": task, "cell": cell,
             "tightness": None if not math.isfinite(acc) else found["epsilon_lower_bound"] / acc,
             "ideal_gaussian_bound": ideal_gaussian_bound(acc, result["delta"], found["canaries"],
                                                  result["confidence"])}
            for found in result["kinds"]]


def _fmt(x, digits=3):
    return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="builtin", choices=sorted(RECIPE))
    parser.add_argument("--cells", default=CELLS)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    name = f"audit_{args.task}" + ("_quick" if args.quick else "")
    rows = saved(name, "rows", [])
    if not args.report:
        from privlora.audit import run_audit

        for cell in args.cells.split(","):
            config = cell_config(args.task, cell, args.seed, args.quick, tuple(args.overrides))
            with tempfile.TemporaryDirectory() as tmp:
                result = run_audit(config, Path(tmp) / "audit", args.canaries)
            rows = saved(name, "rows", [])  # re-read: another process may have added cells
            rows = [r for r in rows if r["cell"] != cell] + _rows(args.task, cell, result)
            save(name, {"rows": rows})
            for found in result["kinds"]:
                print(f"{cell} {found['kind']}: lower bound {found['epsilon_lower_bound']:.3f}, "
                      f"accountant {_fmt(result['epsilon_accountant'])}", flush=True)
    print(table(["cell", "canary kind", "lower bound (95%)", "accountant epsilon", "tightness",
                 "ideal (Gaussian)", "AUC", "guesses right", "canaries", "final acc.",
                 "seconds"],
                [[r["cell"], r["canary_kind"], _fmt(r["epsilon_lower_bound"]),
                  _fmt(r["epsilon_accountant"]),
                  "-" if r["tightness"] is None else f"{r['tightness']:.3f}",
                  _fmt(r.get("ideal_gaussian_bound", math.nan)), f"{r['auc']:.3f}",
                  f"{r['correct']}/{r['guesses']}", r["canaries"],
                  "-" if r.get("final_accuracy") is None else f"{r['final_accuracy']:.3f}",
                  r["seconds"]] for r in rows]))


if __name__ == "__main__":
    main()
