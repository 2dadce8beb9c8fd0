"""Round time and peak memory with 10, 100 and 1,000 simulated clients, 10 sampled per round.

Client-level DP (the mode that needs many clients), the built-in model, the same 20,000 generated
tickets split over the clients, 2 rounds of 10 clients x 1 local step. Each size runs in a fresh
subprocess so its peak RSS is its own; sizes are interleaved over the repeats so drift on a
shared machine hits all of them. Target: memory at 1,000 clients <= 1.1x memory at 10.
Usage: .venv/bin/python bench/scale.py [--model builtin] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

from _common import save, table

SIZES = (10, 100, 1000)
CHILD = """
import json, resource, sys
from pathlib import Path
from privlora.config import load_config
from privlora.server import run
config = load_config(None, sys.argv[2:])
run(config, Path(sys.argv[1]))
print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def measure(clients: int, model: str) -> dict:
    """Run one size in a fresh process; return its peak RSS (MB) and the process's seconds.

    Private runs hide timing in their files, so the benchmark times the process from outside.
    """
    overrides = [f"model.name={model}", f"federation.num_clients={clients}",
                 "federation.clients_per_round=10", "federation.rounds=2",
                 "federation.eval_every=100", "train.local_steps=1", "train.batch_size=4",
                 "data.builtin_examples=20000", "data.max_eval=16", "lora.last_layers=8",
                 "privacy.mode=client", "privacy.noise_multiplier=1.0",
                 "privacy.reproducible_noise=true"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", CHILD, out, *overrides], check=True,
                              capture_output=True, text=True)
    seconds = time.perf_counter() - started
    kb = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_kb"]
    return {"peak_rss_mb": kb / 1024, "process_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {n: [] for n in SIZES}
    for _ in range(args.repeats):
        for n in SIZES:
            runs[n].append(measure(n, args.model))
    med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]} for n in SIZES}
    ratio = statistics.median(b["peak_rss_mb"] / a["peak_rss_mb"]
                              for a, b in zip(runs[10], runs[1000], strict=True))
    save("scale", {"model": args.model, "runs": {str(n): r for n, r in runs.items()},
                   "median": {str(n): m for n, m in med.items()},
                   "rss_ratio_1000_vs_10": ratio, "target_ratio": 1.1})
    print(table(["clients", "sampled per round", "median peak RSS (MB)",
                 "median process seconds (2 rounds, load included)"],
                [[n, 10, f"{med[n]['peak_rss_mb']:.0f}", f"{med[n]['process_seconds']:.1f}"]
                 for n in SIZES]))
    print(f"median RSS ratio 1,000 / 10 clients = {ratio:.3f} over {args.repeats} repeats "
          "(target <= 1.1)")


if __name__ == "__main__":
    main()
