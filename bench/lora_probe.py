"""How fast does a LoRA configuration learn the built-in task without DP, at DP-sized batches?

A cheap screen before spending a private run: one client, uniform batches, Adam, accuracy on 120
held-out tickets every few steps. Usage (each flag optional):
    .venv/bin/python bench/lora_probe.py --lr 1e-2 --batch 32 --steps 24 --last-layers 0 \
        --rank 2 --targets q_proj,v_proj [--train-a]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import save

from privlora import data, models
from privlora.config import load_config
from privlora.evaluate import evaluate
from privlora.lm import per_example_loss
from privlora.lora import LoraSpec, attach, set_trainable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--last-layers", type=int, default=0)
    parser.add_argument("--train-a", action="store_true", help="train A too (default: FFA)")
    args = parser.parse_args()
    config = load_config(None, ["data.builtin_examples=4000", "data.max_eval=120"])
    task = data.load_task(config.data, 0)
    train, held_out = data.split(task, config.data.eval_fraction, config.data.max_eval, 0)
    tokenizer = models.load_tokenizer("builtin")
    examples = data.tokenize(train, task, tokenizer, 128)
    eval_examples = data.tokenize(held_out, task, tokenizer, 128)
    spec = LoraSpec(rank=args.rank, alpha=args.alpha, target_modules=tuple(args.targets.split(",")),
                    last_layers=args.last_layers)
    handles = attach(models.load_model("builtin", "auto"), spec, seed=0)
    params = set_trainable(handles, train_a=args.train_a)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batches = torch.Generator().manual_seed(0)
    started, curve = time.time(), []
    for step in range(1, args.steps + 1):
        handles.model.train()
        picks = torch.randperm(len(examples), generator=batches)[: args.batch].tolist()
        batch = data.collate([examples[i] for i in picks], tokenizer.pad_token_id)
        per_example_loss(handles.model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.every == 0:
            accuracy = evaluate(handles.model, eval_examples, task, tokenizer).accuracy
            curve.append({"step": step, "accuracy": accuracy,
                          "seconds": round(time.time() - started)})
            print(f"step {step}: accuracy {100 * accuracy:.1f}%", flush=True)
    save("lora_probe", {"args": vars(args), "curve": curve})


if __name__ == "__main__":
    main()
