"""Per-example gradient norms of the released LoRA factors, and how much the clipped ones agree.

Why: the clip only matters relative to these norms, and the plan's noise-to-signal assumes the
mean clipped gradient has norm up to 1 x clip (every clipped gradient pointing one way). This
prints, for a batch of a task's training examples, the norms and the agreement
||mean of the clipped gradients|| / clip: 1 when they all point one way, about 1 / sqrt(batch)
for random directions.

    .venv/bin/python bench/grad_norms.py                       # the demo's config, at init
    .venv/bin/python bench/grad_norms.py --task fiqa --steps 5,10,20

``--task T`` uses the recipe ``privacy.recipe = "auto"`` chooses for bench/utility.py's
``sample-8+auto`` cell of task T (what a new user gets), and ``--steps`` measures again after
that many non-private Adam steps of 32 other training examples (the label prior is learned in
the first few, after which the gradients carry only what tells the classes apart). The numbers
are about public datasets in ../shared/data, for calibrating the plan; a user's run never
computes them.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
from _common import save

from privlora import data, models
from privlora.config import load_config
from privlora.lm import per_example_loss
from privlora.lora import attach, set_trainable, spec_of
from privlora.privacy.mechanisms import clip_per_example
from privlora.privacy.per_example import PerExampleGrads
from privlora.rules import build_rule

CHUNK = 16  # examples per backward: the memory of one chunk, whatever --batch
TRAIN_BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--task", default=None, help="bench/utility.py task: its auto recipe")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", default="", help="comma-separated Adam steps to measure after")
    args = parser.parse_args()
    if args.task:
        from utility import auto_config

        from privlora.privacy.recipe import resolve

        config = resolve(auto_config(args.task, "sample-8", 0, False)).config
    else:
        config = load_config(args.config)
    torch.manual_seed(config.seed)
    task = data.load_task(config.data, config.seed)
    train, _ = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    measured, rest = order[: args.batch], order[args.batch:]
    tokenizer = models.load_tokenizer(config.model.name)
    examples = data.tokenize([train[i] for i in measured], task, tokenizer, config.data.max_length)
    model = models.load_model(config.model.name, config.model.dtype)
    handles = attach(model, spec_of(config.lora, model), seed=config.seed)
    train_a = build_rule(config).trains_a
    set_trainable(handles, train_a=train_a)
    handles.model.train()

    def measure() -> dict:
        """Norms and agreement of the measured examples' gradients, clip = config's."""
        total, norms = None, []
        for start in range(0, len(examples), CHUNK):
            chunk = data.collate(examples[start:start + CHUNK], tokenizer.pad_token_id)
            with PerExampleGrads(handles, train_a=train_a) as tracker:
                per_example_loss(handles.model, chunk).sum().backward()
                clipped, chunk_norms = clip_per_example(tracker.collect(), config.privacy.clip)
            total = clipped if total is None else {k: total[k] + clipped[k] for k in total}
            norms += chunk_norms.tolist()
        assert total is not None
        norms.sort()
        mean = math.sqrt(sum(float(t.pow(2).sum()) for t in total.values())) / len(norms)
        return {"min": norms[0], "median": norms[len(norms) // 2], "max": norms[-1],
                "mean_clipped_over_clip": mean / config.privacy.clip}

    steps = sorted(int(s) for s in args.steps.split(",") if s)
    rows = [{"steps": 0, **measure()}]
    optimizer = torch.optim.Adam([p for p in handles.model.parameters() if p.requires_grad],
                                 lr=config.train.lr)
    rng = random.Random(config.seed + 1)
    for step in range(1, (steps[-1] if steps else 0) + 1):
        batch = data.tokenize([train[i] for i in rng.sample(rest, TRAIN_BATCH)], task, tokenizer,
                              config.data.max_length)
        optimizer.zero_grad()
        per_example_loss(handles.model, data.collate(batch, tokenizer.pad_token_id)).mean().backward()
        optimizer.step()
        if step in steps:
            rows.append({"steps": step, **measure()})
    result = {"config": args.task and f"{args.task} (auto, sample-8)" or str(args.config),
              "batch": len(examples), "clip": config.privacy.clip, "loss": config.train.loss,
              "random_directions": 1 / math.sqrt(len(examples)), "rows": rows,
              # the demo's one-line result, as before --steps
              "mean_clipped_over_clip": rows[0]["mean_clipped_over_clip"]}
    save("grad_norms" + (f"_{args.task}" if args.task else ""), result)
    for r in rows:
        print(f"after {r['steps']:>3} steps: per-example gradient norms min {r['min']:.2f}, "
              f"median {r['median']:.2f}, max {r['max']:.2f} (clip {config.privacy.clip}); "
              f"norm of the mean clipped gradient = {r['mean_clipped_over_clip']:.3f} x clip "
              f"(random directions: {result['random_directions']:.3f})")


if __name__ == "__main__":
    main()
