"""Peak memory of a run with 100 simulated clients vs 4 (same model, same data, one round).

Each run is a fresh subprocess so its peak RSS is its own. Target: 100 clients <= 1.2x 4 clients.
Usage: .venv/bin/python bench/memory_clients.py [--model builtin] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile

from _common import save, table

CHILD = """
import resource, sys, json
from pathlib import Path
from privlora.config import load_config
from privlora.server import run
config = load_config(None, sys.argv[2:])
run(config, Path(sys.argv[1]))
print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_rss_mb(clients: int, model: str) -> float:
    overrides = [f"model.name={model}", f"federation.num_clients={clients}",
                 "federation.rounds=1", "train.local_steps=1", "train.batch_size=4",
                 "data.builtin_examples=2000", "data.max_eval=32"]
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", CHILD, out, *overrides], check=True,
                              capture_output=True, text=True)
    kb = __import__("json").loads(done.stdout.strip().splitlines()[-1])["peak_rss_kb"]
    return kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved (4, 100) pairs; the medians are reported")
    args = parser.parse_args()
    pairs = []
    for _ in range(args.repeats):  # interleaved so drift on a shared machine hits both sizes
        pairs.append((peak_rss_mb(4, args.model), peak_rss_mb(100, args.model)))
    four = statistics.median(p[0] for p in pairs)
    hundred = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(h / f for f, h in pairs)
    save("memory_clients", {"model": args.model, "pairs_mb": pairs,
                            "peak_rss_mb_4_clients": four, "peak_rss_mb_100_clients": hundred,
                            "ratio": ratio, "target_ratio": 1.2, "self_rss_kb":
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
    print(table(["clients", "median peak RSS (MB)", "runs (MB)"],
                [[4, f"{four:.0f}", ", ".join(f"{f:.0f}" for f, _ in pairs)],
                 [100, f"{hundred:.0f}", ", ".join(f"{h:.0f}" for _, h in pairs)]]))
    print(f"median ratio 100/4 = {ratio:.3f} over {len(pairs)} pairs (target <= 1.2)")


if __name__ == "__main__":
    main()
