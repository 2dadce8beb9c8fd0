"""The one-run privacy audit as a table: empirical epsilon lower bound against the accountant's.

Each cell is one `privlora audit` run (privlora.audit.run_audit: one federated training run of
the task's recipe, white-box gradient canaries at site 0, each included with probability 1/2)
of bench/utility.py's cells: nodp, sample-8, sample-2.

    .venv/bin/python bench/audit.py --task builtin [--cells nodp,sample-8,sample-2] [--canaries 1000]
    .venv/bin/python bench/audit.py --task sst2
    .venv/bin/python bench/audit.py --task builtin --quick     # tiny random model: a smoke run
    .venv/bin/python bench/audit.py --task builtin --report    # the table from the JSON

Rows accumulate in bench/results/audit_<task>.json (a rerun of a cell replaces it). Tightness =
lower bound / accountant epsilon: 1 would mean the accountant is exact for this attack.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from _common import save, saved, table
from utility import RECIPE, cell_config

CELLS = "nodp,sample-8,sample-2"


def _row(task: str, cell: str, result: dict) -> dict:
    acc = result["epsilon_accountant"]
    return {"task": task, "cell": cell, **result,
            "tightness": None if not math.isfinite(acc) else result["epsilon_lower_bound"] / acc}


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
            rows = [r for r in rows if r["cell"] != cell] + [_row(args.task, cell, result)]
            save(name, {"rows": rows})
            print(f"{cell}: lower bound {result['epsilon_lower_bound']:.3f}, accountant "
                  f"{_fmt(result['epsilon_accountant'])}", flush=True)
    print(table(["cell", "canary kind", "lower bound (95%)", "accountant epsilon", "tightness",
                 "AUC", "guesses right", "canaries", "seconds"],
                [[r["cell"], r["canary_kind"], _fmt(r["epsilon_lower_bound"]),
                  _fmt(r["epsilon_accountant"]),
                  "-" if r["tightness"] is None else f"{r['tightness']:.3f}", f"{r['auc']:.3f}",
                  f"{r['correct']}/{r['guesses']}", r["canaries"], r["seconds"]] for r in rows]))


if __name__ == "__main__":
    main()
