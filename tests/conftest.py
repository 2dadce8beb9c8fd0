"""Shared fixtures: a tiny random Llama (seconds), the built-in tokenizer, one tiny run config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from privlora import models
from privlora.config import RunConfig, load_config
from privlora.models import load_tokenizer
from tests.builders import tiny_llama, with_lora

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores
    torch.set_num_threads(1)

# A federated run on the tiny random Llama: 4 clients x 24 examples, 2 rounds x 2 steps.
TINY_RUN = ("model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=120",
            "data.max_eval=16", "federation.rounds=2", "train.local_steps=2",
            "train.batch_size=4")


@pytest.fixture(scope="session")
def tiny_config():
    """Return a builder: ``tiny_config("privacy.mode=local", ...)`` -> RunConfig."""

    def build(*overrides: str) -> RunConfig:
        return load_config(None, [*TINY_RUN, *overrides])

    return build


@pytest.fixture(scope="session")
def read_metrics():
    """Return a reader of a run directory's metrics.jsonl: one dict per round."""

    def read(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    return read


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("builtin")


@pytest.fixture(scope="session", autouse=True)
def builtin_tokenizer_read_once():
    """Parse the built-in tokenizer's files once per session, not twice per tiny run.

    Why: a run of the tiny model loads it twice (its vocabulary size for the model, then the
    tokenizer itself), 0.15-0.3 s each: a third of a tiny run, a few hundred loads in the suite.
    Every load of it by name ('builtin', 'tiny-random') in this process gets one object, shared
    read-only as the ``tokenizer`` fixture is (a test that changes a tokenizer changes a copy);
    any other source (a bundle, a model directory) and every subprocess still reads its files.
    """
    real, loaded = models._from_pretrained, {}

    def from_pretrained(loader, source, name, **kwargs):
        if loader is not AutoTokenizer or name not in (models.BUILTIN, models.TINY_RANDOM) \
                or kwargs:
            return real(loader, source, name, **kwargs)
        if source not in loaded:
            loaded[source] = real(loader, source, name)
        return loaded[source]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_from_pretrained", from_pretrained)
        yield


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh 2-layer random Llama in float32 with frozen base weights."""
    return tiny_llama(tokenizer)


@pytest.fixture()
def tiny_lora(tiny_model):
    """The tiny Llama wrapped with LoRA r=4 on q_proj and v_proj."""
    return with_lora(tiny_model)
