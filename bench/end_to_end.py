"""The FPB job end to end: privlora against a reference written the way users write it today.

The job (both sides): Financial PhraseBank all-agree from ../shared/data, the same 4 IID clients,
3 rounds x 10 local steps, batch 8, AdamW lr 3e-3, LoRA r=8, alpha 16 on q_proj and v_proj, the
same 300 eval sentences and chat prompts, FedAvg weighted by example counts.

- privlora: ``privlora run`` as shipped (bf16 where the CPU has it natively, answer-only logits,
  eager attention on the CPU), evaluating zero-shot and after the last round
  (``federation.eval_every = 3``).
- reference (lives here, not in the product): a plain loop as FlowerTune-style client code
  does it: HF model in fp32 with its default attention, PEFT LoRA, ``model(..., labels=...)``
  over the full vocabulary, a fresh AdamW per client round, FedAvg of the PEFT state dicts,
  evaluation once at the end from the full-vocabulary logits at the last prompt position.

Each side runs in a fresh subprocess; the pairs alternate order; wall seconds (process start to
finish) and final accuracy are reported, medians over --repeats.
Usage: .venv/bin/python bench/end_to_end.py [--repeats 3] [--report]
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

from _common import load, save, table

FPB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "financial_phrasebank" \
    / "fpb_sentences_allagree.jsonl"
JOB = ["federation.num_clients=4", "federation.rounds=3", "train.local_steps=10",
       "train.batch_size=8", "train.lr=0.003", "data.max_eval=300", "lora.rank=8",
       "lora.alpha=16.0"]


def privlora_job(out: str) -> dict:
    """Run the job with the product; return its final accuracy."""
    import privlora

    config = privlora.load_config(None, [f"data.path={json.dumps(str(FPB.resolve()))}", *JOB,
                                         "federation.eval_every=3"])
    summary = privlora.run(config, out)
    return {"accuracy": summary["final"]["accuracy"]}


def reference_job(out: str) -> dict:
    """Run the job as a user would with HF + PEFT in fp32; return its final accuracy."""
    import torch
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
    from transformers import AutoModelForCausalLM

    from privlora import data
    from privlora.config import load_config
    from privlora.models import load_tokenizer, local_source

    config = load_config(None, [f"data.path={json.dumps(str(FPB.resolve()))}", *JOB])
    task = data.load_task(config.data, config.seed)
    train_rows, eval_rows = data.split(task, config.data.eval_fraction, config.data.max_eval,
                                       config.seed)
    parts = data.partition(train_rows, config.data, 4, config.seed)
    tokenizer = load_tokenizer("builtin")
    clients = [data.tokenize(p, task, tokenizer, config.data.max_length) for p in parts]
    evals = data.tokenize(eval_rows, task, tokenizer, config.data.max_length)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(local_source("builtin")),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    global_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    rng = torch.Generator().manual_seed(0)
    for _ in range(3):
        states, sizes = [], []
        for examples in clients:
            set_peft_model_state_dict(model, global_state)
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                          lr=3e-3)
            for _ in range(10):
                picks = torch.randperm(len(examples), generator=rng)[:8].tolist()
                ids, mask, labels = _padded([examples[i] for i in picks], tokenizer.pad_token_id)
                model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            states.append({k: v.detach().clone()
                           for k, v in get_peft_model_state_dict(model).items()})
            sizes.append(len(examples))
        total = sum(sizes)
        global_state = {k: sum(s[k] * (n / total) for s, n in zip(states, sizes))
                        for k in global_state}
    set_peft_model_state_dict(model, global_state)
    return {"accuracy": _accuracy(model, evals, task, tokenizer)}


def _padded(examples, pad_id):
    """Right-pad prompt + answer; labels are the answer tokens (HF shifts them itself)."""
    import torch

    width = max(len(e.prompt) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for b, e in enumerate(examples):
        seq = list(e.prompt) + list(e.answer)
        ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
        labels[b, len(e.prompt) : len(seq)] = torch.tensor(e.answer)
    return ids, mask, labels


def _accuracy(model, examples, task, tokenizer) -> float:
    """Label with the highest full-vocabulary log-probability at the last prompt position."""
    import torch

    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"][0]
                 for label in task.labels]
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            chunk = examples[start : start + 32]
            ids, mask, _ = _padded([type(e)(e.prompt, (), e.label) for e in chunk],
                                   tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            last = torch.tensor([len(e.prompt) - 1 for e in chunk])
            scores = logits[torch.arange(len(chunk)), last].log_softmax(-1)[:, label_ids]
            gold = torch.tensor([task.labels.index(e.label) for e in chunk])
            correct += int((scores.argmax(1) == gold).sum())
    return correct / len(examples)


def timed(side: str) -> dict:
    """Run one side in a fresh subprocess; return wall seconds and its result."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--side", side, "--out", out],
                              check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--side", choices=["privlora", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: run one side, print its result as the last line
        job = privlora_job if args.side == "privlora" else reference_job
        print(json.dumps(job(str(Path(args.out) / "run"))))
        return
    if not args.report:
        runs: dict[str, list[dict]] = {"privlora": [], "reference": []}
        for rep in range(args.repeats):  # alternate which side runs first
            for side in (("privlora", "reference") if rep % 2 == 0 else ("reference", "privlora")):
                runs[side].append(timed(side))
                print(side, runs[side][-1], flush=True)
        save("end_to_end", {"job": JOB, "repeats": args.repeats, "runs": runs})
    print_table(load("end_to_end")["runs"])


def print_table(runs: dict) -> None:
    rows, median = [], {}
    for side, label in (("privlora", "privlora"), ("reference", "HF + PEFT fp32 reference")):
        seconds = [r["seconds"] for r in runs[side]]
        median[side] = statistics.median(seconds)
        rows.append([label, f"{median[side]:.0f}", ", ".join(f"{s:.0f}" for s in seconds),
                     ", ".join(f"{100 * r['accuracy']:.1f}%" for r in runs[side])])
    print(table(["FPB job", "median wall s", "runs (s)", "final accuracy"], rows))
    print(f"privlora / reference wall time = {median['privlora'] / median['reference']:.2f}")


if __name__ == "__main__":
    main()
