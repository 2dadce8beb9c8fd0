"""Time of one DP-SGD local step over a non-private step on SmolLM2 (batch 8, seq 128).

Both are the product's own step, ``privlora.client.gradient_step`` plus the optimizer step, run
side by side in one process, interleaved, after warm-up; the ratio of medians is reported.
Peak memory of each kind of step is measured in its own subprocess.
Usage: .venv/bin/python bench/dp_step.py [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _common import save, table
from throughput import privlora_step  # the product's step: client.gradient_step + AdamW

SEQ, BATCH = 128, 8


def build(model_name: str = "builtin"):
    """The built-in model with LoRA r=8 on q, v, and 8 examples of about SEQ tokens."""
    import random

    from privlora import builtin_task
    from privlora.config import DataConfig
    from privlora.data import collate, load_task, tokenize
    from privlora.lora import LoraSpec, attach
    from privlora.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    task = load_task(DataConfig(builtin_examples=40), seed=0)
    rows = [{"text": " ".join([r["text"]] + [builtin_task.ticket("billing", random.Random(i + k))
                                             for k in range(3)]), "label": r["label"]}
            for i, r in enumerate(task.rows[:BATCH])]
    # Why the margin: re-tokenizing a cut text can run a few tokens past max_length, and the
    # batch is padded to a multiple of 8; SEQ - 8 keeps every example within SEQ tokens.
    examples = tokenize(rows, task, tokenizer, max_length=SEQ - 8)
    width = collate(examples, tokenizer.pad_token_id).input_ids.shape[1]
    assert width == SEQ, f"the batch is {width} tokens wide, not {SEQ}"
    handles = attach(load_model(model_name, "auto"), LoraSpec(), seed=0)  # as the product runs
    return handles, examples, tokenizer.pad_token_id


def timed(reps: int) -> dict:
    handles, examples, pad_id = build()
    handles.model.train()
    steps = {kind: privlora_step(handles, examples, pad_id, dp=kind == "dp")
             for kind in ("plain", "dp")}
    for _ in range(2):  # warm-up: the first calls allocate and pick kernels
        steps["plain"]()
        steps["dp"]()
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    for rep in range(reps):
        # Alternate which step goes first, so neither always runs on a warmer cache.
        for kind in (("plain", "dp") if rep % 2 == 0 else ("dp", "plain")):
            t0 = time.perf_counter()
            steps[kind]()
            times[kind].append(time.perf_counter() - t0)
    return {"plain_s": times["plain"], "dp_s": times["dp"]}


def peak_mb(kind: str) -> float:
    code = ("import sys, resource; sys.path.insert(0, 'bench'); import dp_step as d;"
            "h, e, pad = d.build(); h.model.train();"
            f"step = d.privlora_step(h, e, pad, dp={kind == 'dp'}); [step() for _ in range(3)];"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    times = timed(args.reps)
    plain, dp = statistics.median(times["plain_s"]), statistics.median(times["dp_s"])
    peaks = {"plain": peak_mb("plain"), "dp": peak_mb("dp")}
    result = {"batch": BATCH, "seq": SEQ, "reps": args.reps, **times,
              "median_plain_s": plain, "median_dp_s": dp, "ratio": dp / plain,
              "target_ratio": 1.1, "peak_rss_mb": peaks}
    save("dp_step", result)
    print(table(["step", "median time (s)", "peak RSS (MB)"],
                [["non-private", f"{plain:.3f}", f"{peaks['plain']:.0f}"],
                 ["DP-SGD (per-example clip + noise)", f"{dp:.3f}", f"{peaks['dp']:.0f}"]]))
    print(f"ratio DP / non-private = {dp / plain:.3f} (target <= 1.10)")
    print(json.dumps({"ratio": dp / plain}))


if __name__ == "__main__":
    main()
