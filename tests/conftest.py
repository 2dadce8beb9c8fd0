"""Shared fixtures: a tiny random Llama (seconds) and the built-in tokenizer."""

from __future__ import annotations

import pytest

from privlora.lora import LoraSpec, attach
from privlora.models import load_tokenizer, tiny_random_llama


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("builtin")


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh 2-layer random Llama in float32 with frozen base weights."""
    model = tiny_random_llama(vocab_size=len(tokenizer))
    model.requires_grad_(False)
    return model


@pytest.fixture()
def tiny_lora(tiny_model):
    """The tiny Llama wrapped with LoRA r=4 on q_proj and v_proj."""
    return attach(tiny_model, LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), seed=0)
