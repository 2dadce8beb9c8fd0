"""Evaluate a (LoRA-adapted) causal LM: label log-likelihood accuracy, answer loss, perplexity."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from privlora.data import Example, Task, collate
from privlora.errors import DataError
from privlora.lm import answer_logits, per_example_loss


@dataclass(frozen=True)
class EvalResult:
    """Metrics on an eval set; accuracy is None for generation tasks."""

    accuracy: float | None
    loss: float
    perplexity: float
    examples: int


def majority_share(labels: Sequence[str | None]) -> float | None:
    """Return the accuracy of always answering the most common gold label (None without labels).

    The floor a classifier must beat: a model that has learned only the label format, or the
    class prior, scores this much.
    """
    known = [label for label in labels if label is not None]
    if not known:
        return None
    return Counter(known).most_common(1)[0][1] / len(known)


def label_token_ids(labels: tuple[str, ...], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Tokenize each label word as it appears at the start of the assistant's answer."""
    return [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]


@torch.no_grad()
def evaluate(model, examples: list[Example], task: Task, tokenizer: PreTrainedTokenizerBase,
             batch_size: int = 32) -> EvalResult:
    """Score ``examples``: mean answer loss, perplexity and (classification) label accuracy."""
    model.eval()
    losses = []
    correct = 0
    label_ids = label_token_ids(task.labels, tokenizer) if task.kind == "classification" else []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        losses.append(per_example_loss(model, collate(chunk, tokenizer.pad_token_id)))
        if label_ids:
            correct += _count_correct(model, chunk, task, label_ids, tokenizer.pad_token_id)
    loss = torch.cat(losses).mean().item()
    accuracy = correct / len(examples) if label_ids else None
    return EvalResult(accuracy, loss, math.exp(min(loss, 50.0)), len(examples))


def _count_correct(model, chunk: list[Example], task: Task, label_ids: list[list[int]],
                   pad_id: int) -> int:
    for e in chunk:
        if e.label not in task.labels:
            raise DataError(
                f"eval label {e.label!r} is not one the model was trained on {list(task.labels)}; "
                "evaluate on data with the training labels"
            )
    gold = torch.tensor([task.labels.index(e.label) for e in chunk])
    scores = label_scores(model, [e.prompt for e in chunk], label_ids, pad_id)  # (B, L)
    return int((scores.argmax(dim=1) == gold).sum())


def label_scores(model, prompts: list[tuple[int, ...]], label_ids: list[list[int]],
                 pad_id: int) -> torch.Tensor:
    """Return log p(label tokens | prompt) for every prompt and label: (B, L)."""
    if all(len(ids) == 1 for ids in label_ids):
        # One forward per prompt: every label is a single token read off the last position.
        batch = collate([Example(p, (0,), None) for p in prompts], pad_id)
        logprobs = answer_logits(model, batch).log_softmax(dim=-1)  # (B, V)
        return logprobs[:, [ids[0] for ids in label_ids]]
    columns = []
    for ids in label_ids:  # multi-token labels: one scored continuation per label
        batch = collate([Example(p, tuple(ids), None) for p in prompts], pad_id)
        logprobs = answer_logits(model, batch).log_softmax(dim=-1)
        token_lp = logprobs.gather(1, batch.targets[batch.target_mask][:, None])[:, 0]
        rows = batch.target_mask.nonzero()[:, 0]
        columns.append(torch.zeros(len(prompts)).index_add(0, rows, token_lp))
    return torch.stack(columns, dim=1)
