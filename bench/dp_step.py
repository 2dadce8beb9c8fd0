"""Time of one DP-SGD local step over a non-private step on SmolLM2 (batch 8, seq 128).

Both steps run side by side in one process, interleaved, after warm-up; the ratio of medians is
reported. Peak memory of each kind of step is measured in its own subprocess.
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
    from privlora import builtin_task
    from privlora.config import DataConfig
    from privlora.data import collate, load_task, tokenize
    from privlora.lora import LoraSpec, attach, set_trainable
    from privlora.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    task = load_task(DataConfig(builtin_examples=40), seed=0)
    rows = [{"text": r["text"] + " " + builtin_task.ticket("billing", __import__("random").Random(i)),
             "label": r["label"]} for i, r in enumerate(task.rows[:BATCH])]
    examples = tokenize(rows, task, tokenizer, max_length=SEQ)
    batch = collate(examples, tokenizer.pad_token_id)
    batch = type(batch)(*(t[:, :SEQ] if t.shape[1] >= SEQ else torch.nn.functional.pad(
        t, (0, SEQ - t.shape[1])) for t in (batch.input_ids, batch.attention_mask,
                                           batch.target_mask, batch.targets)))
    handles = attach(load_model(model_name, "bfloat16"), LoraSpec(), seed=0)
    params = set_trainable(handles, train_a=True)
    return handles, params, batch


def plain_step(handles, params, batch, optimizer) -> None:
    from privlora.lm import per_example_loss

    per_example_loss(handles.model, batch).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dp_step(handles, params, batch, optimizer, named, generator) -> None:
    from privlora.lm import per_example_loss
    from privlora.privacy.mechanisms import add_noise, clip_per_example
    from privlora.privacy.per_example import PerExampleGrads

    with PerExampleGrads(handles, train_a=True) as tracker:
        per_example_loss(handles.model, batch).sum().backward()
        summed, _ = clip_per_example(tracker.collect(), 1.0)
    noisy = add_noise(summed, 1.0, generator)
    for name, param in named.items():
        param.grad = noisy[name] / BATCH
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def named_params(handles):
    from privlora.lora import lora_linears

    named = {}
    for layer, (a, b) in lora_linears(handles).items():
        named[f"{layer}.lora_A"], named[f"{layer}.lora_B"] = a.weight, b.weight
    return named


def timed(reps: int) -> dict:
    handles, params, batch = build()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    named, generator = named_params(handles), torch.Generator().manual_seed(0)
    handles.model.train()
    for _ in range(2):  # warm-up: oneDNN compiles kernels for these shapes
        plain_step(handles, params, batch, optimizer)
        dp_step(handles, params, batch, optimizer, named, generator)
    plain, dp = [], []
    for rep in range(reps):
        # Alternate which step goes first, so neither always runs on a warmer cache.
        order = ("plain", "dp") if rep % 2 == 0 else ("dp", "plain")
        for kind in order:
            t0 = time.perf_counter()
            if kind == "plain":
                plain_step(handles, params, batch, optimizer)
                plain.append(time.perf_counter() - t0)
            else:
                dp_step(handles, params, batch, optimizer, named, generator)
                dp.append(time.perf_counter() - t0)
    return {"plain_s": plain, "dp_s": dp}


def peak_mb(kind: str) -> float:
    code = ("import sys, json, resource, torch; sys.path.insert(0, 'bench'); import dp_step as d;"
            "h, p, b = d.build(); o = torch.optim.AdamW(p, lr=1e-4); h.model.train();"
            f"[d.{kind}_step(h, p, b, o" + (", d.named_params(h), torch.Generator()" if kind == "dp"
                                            else "") + ") for _ in range(3)];"
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
