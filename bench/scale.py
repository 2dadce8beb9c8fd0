"""Round time and peak memory with 10, 100 and 1,000 simulated clients, a fixed number sampled.

Client-level DP (the mode that needs many clients), the built-in model, the same 20,000 generated
tickets split over the clients, 2 rounds of ``--per-round`` clients (at most all of them) x 1
local step. Each size runs in a fresh subprocess so its peak RSS (and, on a GPU, its peak CUDA
allocation) is its own; sizes are interleaved over the repeats so drift on a shared machine hits
all of them. Target: memory at 1,000 clients <= 1.1x memory at 10.
Usage: .venv/bin/python bench/scale.py [--model builtin] [--repeats 3] [--per-round 10]
       [--device cpu|cuda]   (rows are saved per device: scale.json, scale_cuda.json)
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
import torch
from privlora.config import load_config
from privlora.simulation import run
config = load_config(None, sys.argv[2:])
run(config, Path(sys.argv[1]))
cuda = torch.cuda.is_available() and config.model.device != "cpu"
print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None}))
"""


def measure(clients: int, per_round: int, model: str, device: str) -> dict:
    """Run one size in a fresh process; return its peak RSS and CUDA memory (MB) and seconds.

    Private runs hide timing in their files, so the benchmark times the process from outside.
    """
    overrides = [f"model.name={model}", f"model.device={device}",
                 f"federation.num_clients={clients}",
                 f"federation.clients_per_round={min(per_round, clients)}",
                 "federation.rounds=2", "federation.eval_every=100", "train.local_steps=1",
                 "train.batch_size=4", "data.builtin_examples=20000", "data.max_eval=16",
                 "lora.last_layers=8", "privacy.mode=client", "privacy.noise_multiplier=1.0",
                 "privacy.reproducible_noise=true"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", CHILD, out, *overrides],
                              capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{clients} clients failed:\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    cuda = peaks.get("peak_cuda_bytes")
    return {"peak_rss_mb": peaks["peak_rss_kb"] / 1024,
            "peak_cuda_mb": None if cuda is None else cuda / 2**20,
            "process_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=10,
                        help="clients sampled per round (expected count; at most all of them)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {n: [] for n in SIZES}
    for _ in range(args.repeats):
        for n in SIZES:
            runs[n].append(measure(n, args.per_round, args.model, args.device))
            print(f"{n} clients: {runs[n][-1]}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in runs[n]) if runs[n][0][k] is not None
               else None for k in runs[n][0]} for n in SIZES}
    ratio = statistics.median(b["peak_rss_mb"] / a["peak_rss_mb"]
                              for a, b in zip(runs[10], runs[1000], strict=True))
    cuda_ratio = (statistics.median(b["peak_cuda_mb"] / a["peak_cuda_mb"]
                                    for a, b in zip(runs[10], runs[1000], strict=True))
                  if args.device == "cuda" else None)
    save("scale" if args.device == "cpu" else f"scale_{args.device}",
         {"model": args.model, "device": _device_name(args.device), "per_round": args.per_round,
          "runs": {str(n): r for n, r in runs.items()},
          "median": {str(n): m for n, m in med.items()}, "rss_ratio_1000_vs_10": ratio,
          "cuda_ratio_1000_vs_10": cuda_ratio, "target_ratio": 1.1})
    print(table(["clients", "sampled per round", "median peak RSS (MB)", "median peak CUDA (MB)",
                 "median process seconds (2 rounds, load included)"],
                [[n, min(args.per_round, n), f"{med[n]['peak_rss_mb']:.0f}",
                  "-" if med[n]["peak_cuda_mb"] is None else f"{med[n]['peak_cuda_mb']:.0f}",
                  f"{med[n]['process_seconds']:.1f}"] for n in SIZES]))
    print(f"median RSS ratio 1,000 / 10 clients = {ratio:.3f} over {args.repeats} repeats "
          "(target <= 1.1)" + ("" if cuda_ratio is None else
                               f"; peak CUDA ratio = {cuda_ratio:.3f}"))


def _device_name(device: str) -> str:
    """Name the device the rows were measured on (the GPU's own name on CUDA)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return "cpu"


if __name__ == "__main__":
    main()
