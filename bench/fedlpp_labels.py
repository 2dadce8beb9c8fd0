"""Why a FedLPP adapter transfers poorly: each base's label preferences, with and without it.

    .venv/bin/python bench/fedlpp_labels.py bench/results/runs/fedlpp_builtin/q4_0-logits-0-default

Reads a finished classification run with a quantized base (its config.toml and last checkpoint)
and prints, for the server's base (W) and the clients' quantized base (Q), each without and
with the run's adapter (+A): accuracy, how often each label is predicted, and the mean
renormalised log-probability of each label over the eval set; then the accuracy of W+A with
each label's score centred on its mean over the eval inputs (an oracle: it reads them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from pathlib import Path

import torch
from _common import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--round", type=int, default=None,
                        help="the checkpoint of this round (default: the last)")
    args = parser.parse_args()
    from privlora.config import config_from_toml
    from privlora.data import collate
    from privlora.evaluate import first_answer_rows, label_token_ids
    from privlora.lm import answer_logits
    from privlora.lora import unflatten, write_adapter
    from privlora.run_dir import checkpoint_tensors, last_checkpoint
    from privlora.simulation import prepare

    sim = prepare(config_from_toml((args.run / "config.toml").read_text()))
    adapter = unflatten(last_checkpoint(args.run).tensors if args.round is None
                        else checkpoint_tensors(args.run, args.round))
    examples, task, tokenizer = sim.server.eval_examples, sim.server.task, sim.tokenizer
    columns = [ids[0] for ids in label_token_ids(task.labels, tokenizer)]
    gold = torch.tensor([task.labels.index(e.label) for e in examples])
    write_adapter(sim.central, adapter)
    write_adapter(sim.handles, adapter)

    @torch.no_grad()
    def scores(model, adapted: bool) -> torch.Tensor:
        rows = []
        for start in range(0, len(examples), 32):
            batch = collate(examples[start : start + 32], tokenizer.pad_token_id)
            with contextlib.nullcontext() if adapted else model.disable_adapter():
                logits = answer_logits(model, batch)
            rows.append(logits[first_answer_rows(batch)].log_softmax(-1)[:, columns])
        return torch.cat(rows).log_softmax(dim=1)  # renormalised over the labels

    models = {"W": (sim.central.model, False), "Q": (sim.handles.model, False),
              "W+A": (sim.central.model, True), "Q+A": (sim.handles.model, True)}
    lines = []
    for name, (model, adapted) in models.items():
        s = scores(model, adapted)
        counts = collections.Counter(s.argmax(1).tolist())
        lines.append([name, f"{float((s.argmax(1) == gold).float().mean()):.3f}",
                      " ".join(f"{counts.get(i, 0)}" for i in range(len(task.labels))),
                      " ".join(f"{v:.2f}" for v in s.mean(0).tolist())])
        if name == "W+A":
            centred = float(((s - s.mean(0)).argmax(1) == gold).float().mean())
    gold_counts = collections.Counter(gold.tolist())
    print(f"labels {list(task.labels)}; gold counts "
          f"{' '.join(str(gold_counts.get(i, 0)) for i in range(len(task.labels)))}\n")
    print(table(["model", "accuracy", "predicted per label", "mean label log-prob"], lines))
    print(f"\nW+A with each label's score centred on its eval mean (oracle): {centred:.3f}")


if __name__ == "__main__":
    main()
