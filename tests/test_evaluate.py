"""Evaluation pinned against an independent reference: a full HF forward per example and label."""

from __future__ import annotations

import math

import pytest
import torch

from privlora import builtin_task, data
from privlora.evaluate import evaluate, majority_share
from privlora.lora import lora_linears


def _randomize_b(handles) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, lora_b in lora_linears(handles).values():
            lora_b.weight.copy_(torch.randn(lora_b.weight.shape, generator=g))


def _log_probs(model, prompt, continuation) -> torch.Tensor:
    """log p(each continuation token | prompt and the tokens before it), one unpadded forward."""
    ids = torch.tensor([list(prompt) + list(continuation)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # full vocabulary
    return logits.log_softmax(-1).gather(1, torch.tensor(continuation)[:, None])[:, 0]


def _reference(model, examples, task, tokenizer) -> tuple[float | None, float]:
    losses, correct = [], 0
    for e in examples:
        losses.append(-_log_probs(model, e.prompt, e.answer).mean().item())
        if task.kind == "classification":
            scores = [_log_probs(model, e.prompt, tokenizer(label, add_special_tokens=False)
                                 ["input_ids"]).sum().item() for label in task.labels]
            correct += task.labels[max(range(len(scores)), key=scores.__getitem__)] == e.label
    accuracy = correct / len(examples) if task.kind == "classification" else None
    return accuracy, sum(losses) / len(losses)


@pytest.mark.parametrize("labels", [("red", "blue", "green", "amber"),  # one token each
                                    ("red team", "blue team", "green team", "amber team")])
def test_evaluate_matches_a_forward_per_example_and_label(tiny_lora, tokenizer, labels):
    _randomize_b(tiny_lora)
    generated = builtin_task.generate(24, seed=1)
    words = dict(zip(("red", "blue", "green", "amber"), labels, strict=True))
    rows = [{"text": r["text"], "label": words[r["label"]]} for r in generated]
    task = data.Task("t", "classification", builtin_task.INSTRUCTION, tuple(sorted(labels)),
                     tuple(rows))
    examples = data.tokenize(rows, task, tokenizer, max_length=96)
    result = evaluate(tiny_lora.model, examples, task, tokenizer, batch_size=5)
    accuracy, loss = _reference(tiny_lora.model, examples, task, tokenizer)
    assert result.accuracy == accuracy
    assert result.loss == pytest.approx(loss, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-4)
    assert 0 < result.accuracy < 1  # a random adapter: some right, some wrong


def test_evaluate_generation_reports_loss_only(tiny_lora, tokenizer):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    task = data.Task("g", "generation", "", (), tuple(rows))
    examples = data.tokenize(rows, task, tokenizer, max_length=64)
    result = evaluate(tiny_lora.model, examples, task, tokenizer, batch_size=4)
    _, loss = _reference(tiny_lora.model, examples, task, tokenizer)
    assert result.accuracy is None and result.loss == pytest.approx(loss, rel=1e-4)


def test_majority_share_is_the_most_common_labels_fraction():
    assert majority_share(["a", "b", "a", "c"]) == 0.5
    assert majority_share(["a", None, "a"]) == 1.0  # unlabelled (generation) rows are skipped
    assert majority_share([None, None]) is None
