"""``train.max_minutes``: a compute budget in minutes, as examples processed on this machine.

``privacy.recipe = "auto"`` plans in examples processed (``train.max_examples_processed``). A
user thinks in minutes, so auto times the run's own local step here, once, before the run:
``client.local_update`` with the config's model and the adapter and loss auto chose, on one
microbatch of synthetic examples of ``data.max_length`` tokens (random ids: no data is read, so
the timing says nothing about anyone's rows), one warm-up step, then ``REPEATS`` steps. The
budget is minutes x 60 / seconds per example, saved in config.toml like every choice of auto,
so a resumed run or a Flower site uses the same number. Real examples are usually shorter than
``data.max_length``, so training usually takes less than the minutes given; evaluation, loading
and tokenizing are not counted. The timing is of the machine that resolves the recipe (the
simulation's, or the Flower server's): sites on slower machines take longer.
"""

from __future__ import annotations

import math
import time

import torch

from privlora.config import RunConfig
from privlora.data import Example

REPEATS = 3  # timed steps, after one warm-up step
LABELS = 3  # synthetic label tokens, for train.loss = "label"
ANSWER_TOKENS = 2  # a label word and the end of the turn


def synthetic_examples(count: int, vocab_size: int, max_length: int,
                       seed: int) -> tuple[list[Example], tuple[int, ...]]:
    """``count`` examples of random token ids, ``max_length`` tokens each (no data), whose
    answers start with one of ``LABELS`` label tokens; return them and the label tokens."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, max_length - ANSWER_TOKENS)
    ids = torch.randint(vocab_size, (count, prompt + ANSWER_TOKENS), generator=g)
    labels = tuple(range(LABELS))
    ids[:, prompt] = torch.arange(count) % LABELS  # each answer starts with a label token
    rows = ids.tolist()
    return [Example(tuple(r[:prompt]), tuple(r[prompt:]), None) for r in rows], labels


def seconds_per_example(config: RunConfig) -> float:
    """Time the product's local update (``client.local_update``: DP-SGD with per-example
    clipping in sample mode, plain steps otherwise; the config's loss, optimizer, microbatch,
    threads and checkpointing) on synthetic examples, one microbatch per step; return seconds
    per example over ``REPEATS`` steps after a warm-up step."""
    from privlora.client import LocalSpec, local_update
    from privlora.lora import attach, read_adapter, spec_of
    from privlora.models import compute_threads, load_model, load_tokenizer
    from privlora.privacy.client_dp import SampleDP

    t = config.train
    tokenizer = load_tokenizer(config.model.name)
    examples, labels = synthetic_examples(t.microbatch, len(tokenizer), config.data.max_length,
                                          config.seed)
    sample_dp = (SampleDP(clip=config.privacy.clip, noise_multiplier=1.0, sample_rate=1.0,
                          divisor=float(t.microbatch),
                          secure=not config.privacy.reproducible_noise)
                 if config.privacy.mode == "sample" else None)

    def spec(steps: int) -> LocalSpec:
        return LocalSpec(steps=steps, batch_size=t.microbatch, lr=t.lr, optimizer=t.optimizer,
                         momentum=t.momentum, weight_decay=t.weight_decay,
                         train_a=config.federation.aggregation != "ffa", sample_dp=sample_dp,
                         send_counts=False, microbatch=t.microbatch,
                         label_tokens=labels if t.label_only else (),
                         gradient_checkpointing=t.gradient_checkpointing)

    model = load_model(config.model.name, config.model.dtype, config.model.device)
    handles = attach(model, spec_of(config.lora, model), seed=config.seed)
    start, pad = read_adapter(handles), tokenizer.pad_token_id or 0
    rng = torch.Generator().manual_seed(config.seed)
    with compute_threads(t.threads):
        local_update(handles, start, examples, spec(1), rng, rng, pad)  # warm-up
        began = time.perf_counter()
        local_update(handles, start, examples, spec(REPEATS), rng, rng, pad)
        seconds = time.perf_counter() - began
    return seconds / (REPEATS * len(examples))


def examples_in(minutes: float, per_example: float) -> int:
    """The examples ``minutes`` of training pay for at ``per_example`` seconds each."""
    if not (per_example > 0 and math.isfinite(per_example)):
        raise ValueError(f"seconds per example must be positive and finite, not {per_example}")
    return max(1, int(minutes * 60 / per_example))
