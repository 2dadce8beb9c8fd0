"""Cost of the per-round checkpoint that ``--resume`` needs: milliseconds and bytes per round.

Writes the product's own checkpoint (``RunDir.checkpoint``: the adapter, the ledger and the
loop's state, each fsynced, the folder renamed into place) for the built-in model's adapters of
the demo (FFA rank 2 on v_proj) and of the default recipe (rank 8 on q_proj, v_proj), with a
ledger of 4 clients x 10 rounds of sample-mode events. Median of --reps writes; the disk and
the machine are this one's.
Usage: .venv/bin/python bench/checkpoint.py [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import save, table

ROOT = Path(__file__).resolve().parent.parent


def adapters() -> dict[str, dict]:
    from privlora.config import load_config
    from privlora.lora import attach, flatten, read_adapter
    from privlora.lora import spec_of as lora_spec_of
    from privlora.models import load_model

    model = load_model("builtin", "float32", "cpu")
    found = {}
    for name, config in {"demo (v_proj, r=2)": load_config(ROOT / "configs" / "demo.toml"),
                         "default (q_proj+v_proj, r=8)": load_config(None)}.items():
        handles = attach(model, lora_spec_of(config.lora, model), seed=0)
        found[name] = flatten(read_adapter(handles))
        handles.model.unload()  # the next spec wraps the bare model again
    return found


def ledger() -> dict:
    from privlora.privacy.plan import SampleLevel

    plan = SampleLevel(noise_multiplier=1.0, clip=1.0, delta=1e-5, accountant="pld",
                       target_epsilon=None, reproducible_noise=False, rounds=10, num_clients=4,
                       sample_rate=0.01, steps_per_round=14, divisor=36.0)
    book = plan.new_ledger()
    for _ in range(10):
        for party, event in plan.round_events(range(4)).items():
            book.record(party, event)
    return book.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    from privlora.run_dir import RunDir

    spent, rows = ledger(), []
    state = {"format": 1, "round": 1, "run_id": "0" * 32, "zero_shot": {}, "last_eval": {},
             "noise_multiplier": 1.0, "seconds": None}
    for name, tensors in adapters().items():
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # the disk runs are written to
            files = RunDir(Path(tmp))
            times, size = [], 0
            for r in range(1, args.reps + 1):
                t0 = time.perf_counter()
                size = files.checkpoint(r, tensors, spent, state)
                times.append(1000 * (time.perf_counter() - t0))
        rows.append({"adapter": name, "ms_median": statistics.median(times),
                     "ms_max": max(times), "bytes": size,
                     "adapter_numbers": sum(t.numel() for t in tensors.values())})
    save("checkpoint", {"reps": args.reps, "rows": rows})
    print(table(["adapter", "numbers", "bytes per checkpoint", "ms (median)", "ms (max)"],
                [[r["adapter"], f"{r['adapter_numbers']:,}", f"{r['bytes']:,}",
                  f"{r['ms_median']:.1f}", f"{r['ms_max']:.1f}"] for r in rows]))


if __name__ == "__main__":
    main()
