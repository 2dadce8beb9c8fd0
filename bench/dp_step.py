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

import torch
from _common import save, table

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
    # batch is padded to a multiple of 32; SEQ - 8 keeps every example within SEQ tokens.
    examples = tokenize(rows, task, tokenizer, max_length=SEQ - 8)
    width = collate(examples, tokenizer.pad_token_id).input_ids.shape[1]
    assert width == SEQ, f"the batch is {width} tokens wide, not {SEQ}"
    handles = attach(load_model(model_name, "bfloat16"), LoraSpec(), seed=0)
    return handles, examples, tokenizer.pad_token_id


def specs():
    """The two local steps compared: plain, and DP-SGD as the product runs it by default
    (q = 1 over the 8 examples, so both steps see the same batch; OS CSPRNG noise)."""
    from privlora.client import LocalSpec
    from privlora.privacy.local import SampleDP

    plain = LocalSpec(steps=1, batch_size=BATCH, lr=1e-4)
    dp = LocalSpec(steps=1, batch_size=BATCH, lr=1e-4,
                   sample_dp=SampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=1.0,
                                      divisor=float(BATCH), secure=True))
    return {"plain": plain, "dp": dp}


def make_step(handles, examples, pad_id, spec):
    """Return one local step of the product: client.gradient_step, then the optimizer."""
    from privlora.client import gradient_step
    from privlora.lora import set_trainable, trained_parameters

    optimizer = torch.optim.AdamW(set_trainable(handles, train_a=True), lr=spec.lr)
    named = trained_parameters(handles, train_a=True)
    rng = torch.Generator().manual_seed(0)

    def step() -> None:
        gradient_step(handles, examples, spec, named, rng, rng, pad_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(reps: int) -> dict:
    handles, examples, pad_id = build()
    handles.model.train()
    steps = {kind: make_step(handles, examples, pad_id, spec) for kind, spec in specs().items()}
    for _ in range(2):  # warm-up: oneDNN compiles kernels for these shapes
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
            f"step = d.make_step(h, e, pad, d.specs()[{kind!r}]); [step() for _ in range(3)];"
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
              "target_ratio": 1.5, "peak_rss_mb": peaks}
    save("dp_step", result)
    print(table(["step", "median time (s)", "peak RSS (MB)"],
                [["non-private", f"{plain:.3f}", f"{peaks['plain']:.0f}"],
                 ["DP-SGD (per-example clip + noise)", f"{dp:.3f}", f"{peaks['dp']:.0f}"]]))
    print(f"ratio DP / non-private = {dp / plain:.3f} (target <= 1.5)")
    print(json.dumps({"ratio": dp / plain}))


if __name__ == "__main__":
    main()
