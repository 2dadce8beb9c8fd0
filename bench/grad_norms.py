"""Per-example gradient norms of the demo's released LoRA factors at initialisation.

Why: the clip only matters relative to these norms, and the plan's noise-to-signal assumes the
mean clipped gradient has norm up to 1 x clip; this prints both for a batch of built-in tickets.
Usage: .venv/bin/python bench/grad_norms.py [--config configs/demo.toml] [--batch 32]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from _common import save

from privlora import data, models
from privlora.config import load_config
from privlora.lm import per_example_loss
from privlora.lora import attach, set_trainable, spec_of
from privlora.privacy.mechanisms import clip_per_example
from privlora.privacy.per_example import PerExampleGrads
from privlora.rules import build_rule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    config = load_config(args.config)
    task = data.load_task(config.data, config.seed)
    train, _ = data.split(task, config.data.eval_fraction, config.data.max_eval, config.seed)
    tokenizer = models.load_tokenizer(config.model.name)
    examples = data.tokenize(train[: args.batch], task, tokenizer, config.data.max_length)
    model = models.load_model(config.model.name, config.model.dtype)
    handles = attach(model, spec_of(config.lora, model), seed=config.seed)
    train_a = build_rule(config).trains_a
    set_trainable(handles, train_a=train_a)
    handles.model.train()
    with PerExampleGrads(handles, train_a=train_a) as tracker:
        per_example_loss(handles.model, data.collate(examples, tokenizer.pad_token_id)).sum().backward()
        clipped_sum, norms = clip_per_example(tracker.collect(), config.privacy.clip)
    norms = sorted(norms.tolist())
    mean_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in clipped_sum.values())) / len(norms)
    result = {"config": str(args.config), "batch": len(norms), "min": norms[0],
              "median": norms[len(norms) // 2], "max": norms[-1], "clip": config.privacy.clip,
              "mean_clipped_over_clip": mean_norm / config.privacy.clip}
    save("grad_norms", result)
    print(f"per-example gradient norms: min {norms[0]:.2f}, median {result['median']:.2f}, "
          f"max {norms[-1]:.2f} (clip {config.privacy.clip}); norm of the mean clipped gradient "
          f"= {result['mean_clipped_over_clip']:.3f} x clip")


if __name__ == "__main__":
    main()
