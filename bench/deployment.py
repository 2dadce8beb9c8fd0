"""Seconds per round on Flower's deployment engine against the in-process simulation, side by
side in one run: the built-in model, 2 clients, the same config and seeds (no DP, so each
round's duration is in metrics.jsonl). Target: deployment <= 1.2x the simulation per round.

The deployment is a real SuperLink and 2 SuperNodes on 127.0.0.1 (``privlora flower local``):
gRPC, each node's ClientApps forked from one warm worker (``privlora flower worker``: the
imports are paid once; the model is loaded per message), the sites training in
parallel with the machine's cores split between them, where the simulation trains them one
after the other on all cores. The runtimes alternate over ``--repeats`` so drift on a shared
machine hits both; medians are reported. Also measured: what one fresh ClientApp process costs
(importing the app, loading the model: what the warm worker saves, and what it still pays), and
how far the two final adapters are apart.

    .venv/bin/python bench/deployment.py                 # 3 repeats x 3 rounds
    .venv/bin/python bench/deployment.py --quick         # tiny model, 1 repeat (smoke run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save, table

IMPORT_COST = """
import time
t0 = time.perf_counter()
import privlora.flower.client_app
t1 = time.perf_counter()
from privlora.models import load_model
load_model(%r, "auto", "cpu")
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def overrides(args: argparse.Namespace) -> list[str]:
    base = ["federation.num_clients=2", f"federation.rounds={args.rounds}",
            f"train.local_steps={args.local_steps}", "data.max_eval=64"]
    if args.quick:
        return [*base, "model.name=tiny-random", "model.dtype=float32",
                "data.builtin_examples=120", "train.batch_size=4"]
    return [*base, f"model.name={args.model}"]


def round_seconds(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows if r["round"] > 0]


def final_gap(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (a, b))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def clientapp_cost(model: str) -> tuple[float, float]:
    """Seconds to import the ClientApp and to load the model, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", IMPORT_COST % model], check=True,
                          capture_output=True, text=True)
    imports, load = (float(x) for x in done.stdout.split())
    return imports, load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rounds, args.local_steps = 1, 2, 2

    from privlora.config import load_config
    from privlora.flower.local import run_local
    from privlora.simulation import run

    config = load_config(None, overrides(args))
    sim, dep, walls, gaps, costs = [], [], {"simulation": [], "deployment": []}, [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run(config, Path(tmp) / "sim")
            walls["simulation"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_local(config, Path(tmp) / "flower")
            walls["deployment"].append(time.perf_counter() - t0)
            sim += round_seconds(Path(tmp) / "sim")
            dep += round_seconds(Path(tmp) / "flower")
            gaps.append(final_gap(Path(tmp) / "sim", Path(tmp) / "flower"))
        costs.append(clientapp_cost(config.model.name))
        print(f"repeat {repeat + 1}: simulation {sim[-args.rounds:]}, deployment "
              f"{dep[-args.rounds:]} s per round", flush=True)
    med_sim, med_dep = statistics.median(sim), statistics.median(dep)
    result = {
        "config": overrides(args), "repeats": args.repeats,
        "seconds_per_round": {"simulation": sim, "deployment": dep},
        "median_seconds_per_round": {"simulation": med_sim, "deployment": med_dep},
        "ratio": med_dep / med_sim,
        "wall_seconds": walls,
        "clientapp_import_seconds": statistics.median(c[0] for c in costs),
        "model_load_seconds": statistics.median(c[1] for c in costs),
        "final_adapter_max_abs_difference": max(gaps),
    }
    name = "deployment_quick" if args.quick else "deployment"
    path = save(name, result)
    print(table(["runtime", "median s / round", "median wall s (incl. start)", "ratio"], [
        ["in-process simulation", f"{med_sim:.1f}",
         f"{statistics.median(walls['simulation']):.1f}", "1.00"],
        ["Flower (SuperLink + 2 SuperNodes)", f"{med_dep:.1f}",
         f"{statistics.median(walls['deployment']):.1f}", f"{med_dep / med_sim:.2f}"],
    ]))
    print(f"a fresh ClientApp process: {result['clientapp_import_seconds']:.1f} s of imports, "
          f"{result['model_load_seconds']:.1f} s to load the model; final adapters differ by at "
          f"most {result['final_adapter_max_abs_difference']:.2g}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
