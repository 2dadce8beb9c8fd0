"""``train.max_minutes``: a compute budget in minutes, as examples processed on this machine.

``privacy.recipe = "auto"`` plans in examples processed (``train.max_examples_processed``). A
user thinks in minutes, so auto can time the run's own local step here, once, before the run:
the model of the config with the adapter auto chose, on synthetic examples of
``data.max_length`` tokens (random ids: no data is read, so the timing says nothing about
anyone's rows), one warm-up and then the median of ``REPEATS``. The budget is then
minutes x 60 / seconds per example, saved in config.toml like every choice of auto, so a resumed
run or a Flower site uses the same number. Real examples are usually shorter than
``data.max_length``, so the run's training usually takes less than the minutes given, rarely more;
evaluation, loading and tokenizing are not counted. The timing is of the machine that resolves
the recipe (the simulation's, or the Flower server's): sites on slower machines take longer.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from privlora.config import RunConfig
from privlora.data import Example

REPEATS = 3
EXAMPLES = 16  # per timed step: the default microbatch's half, a fair per-example cost
ANSWER_TOKENS = 2  # a label word and the end of the turn


def synthetic_examples(vocab_size: int, max_length: int, seed: int) -> list[Example]:
    """``EXAMPLES`` examples of random token ids, ``max_length`` tokens each (no data)."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, max_length - ANSWER_TOKENS)
    ids = torch.randint(vocab_size, (EXAMPLES, prompt + ANSWER_TOKENS), generator=g).tolist()
    return [Example(tuple(row[:prompt]), tuple(row[prompt:]), None) for row in ids]


def seconds_per_example(config: RunConfig) -> float:
    """Time the config's local step (DP-SGD with per-example clipping in sample mode, a plain
    step otherwise) on synthetic examples; return seconds per example (median of REPEATS)."""
    from privlora.client import LocalSpec, gradient_step
    from privlora.lora import attach, set_trainable, spec_of, trained_parameters
    from privlora.models import (
        compute_threads,
        gradient_checkpointing,
        load_model,
        load_tokenizer,
        wants_checkpointing,
    )
    from privlora.privacy.client_dp import SampleDP

    train_a = config.federation.aggregation != "ffa"
    sample_dp = (SampleDP(clip=config.privacy.clip, noise_multiplier=1.0, sample_rate=1.0,
                          divisor=float(EXAMPLES),
                          secure=not config.privacy.reproducible_noise)
                 if config.privacy.mode == "sample" else None)
    spec = LocalSpec(steps=1, batch_size=EXAMPLES, lr=config.train.lr, train_a=train_a,
                     sample_dp=sample_dp, send_counts=False, microbatch=config.train.microbatch)
    tokenizer = load_tokenizer(config.model.name)
    model = load_model(config.model.name, config.model.dtype, config.model.device)
    handles = attach(model, spec_of(config.lora, model), seed=config.seed)
    optimizer = torch.optim.AdamW(set_trainable(handles, train_a=train_a), lr=spec.lr)
    named = trained_parameters(handles, train_a)
    examples = synthetic_examples(len(tokenizer), config.data.max_length, config.seed)
    rng = torch.Generator().manual_seed(config.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    handles.model.train()
    times = []
    checkpointing = wants_checkpointing(config.train.gradient_checkpointing, handles.model)
    with compute_threads(config.train.threads), \
            gradient_checkpointing(handles.model, checkpointing):
        for repeat in range(REPEATS + 1):  # the first is a warm-up
            start = time.perf_counter()
            gradient_step(handles, examples, spec, named, rng, rng, pad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if repeat:
                times.append(time.perf_counter() - start)
    return statistics.median(times) / EXAMPLES


def examples_in(minutes: float, per_example: float) -> int:
    """The examples ``minutes`` of training pay for at ``per_example`` seconds each."""
    if not (per_example > 0 and math.isfinite(per_example)):
        raise ValueError(f"seconds per example must be positive and finite, not {per_example}")
    return max(1, int(minutes * 60 / per_example))
