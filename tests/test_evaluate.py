"""Evaluation pinned against an independent reference: a full HF forward per example and label."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch

from privlora import builtin_task, data
from privlora.errors import DataError
from privlora.evaluate import (
    evaluate,
    loss_drop,
    macro_f1,
    majority_share,
    training_label_tokens,
)
from privlora.lm import per_example_loss
from tests.builders import randomize_lora_b


def _log_probs(model, prompt, continuation) -> torch.Tensor:
    """log p(each continuation token | prompt and the tokens before it), one unpadded forward."""
    ids = torch.tensor([list(prompt) + list(continuation)])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # full vocabulary
    return logits.log_softmax(-1).gather(1, torch.tensor(continuation)[:, None])[:, 0]


def _confusion_macro_f1(gold: list[int], predicted: list[int]) -> float:
    """Macro-F1 from a confusion matrix: per label, precision and recall, then their harmonic mean."""
    labels = sorted(set(gold) | set(predicted))
    matrix = {(g, p): 0 for g in labels for p in labels}
    for g, p in zip(gold, predicted, strict=True):
        matrix[g, p] += 1
    f1s = []
    for k in labels:
        tp = matrix[k, k]
        predicted_k = sum(matrix[g, k] for g in labels)
        gold_k = sum(matrix[k, p] for p in labels)
        precision = tp / predicted_k if predicted_k else 0.0
        recall = tp / gold_k if gold_k else 0.0
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return sum(f1s) / len(f1s)


def _reference(model, examples, task, tokenizer) -> tuple:
    """(accuracy, answer loss, macro-F1, loss over the label words alone), None where n/a."""
    losses, correct, gold, predicted, among = [], 0, [], [], []
    for e in examples:
        losses.append(-_log_probs(model, e.prompt, e.answer).mean().item())
        if task.kind == "classification":
            scores = [_log_probs(model, e.prompt, tokenizer(label, add_special_tokens=False)
                                 ["input_ids"]).sum().item() for label in task.labels]
            best = max(range(len(scores)), key=scores.__getitem__)
            among.append(-torch.tensor(scores).log_softmax(0)[task.labels.index(e.label)].item())
            correct += task.labels[best] == e.label
            gold.append(task.labels.index(e.label))
            predicted.append(best)
    if task.kind != "classification":
        return None, sum(losses) / len(losses), None, None
    return (correct / len(examples), sum(losses) / len(losses), _confusion_macro_f1(gold, predicted),
            sum(among) / len(among))


@pytest.mark.parametrize("labels", [("red", "blue", "green", "amber"),  # one token each
                                    ("red team", "blue team", "green team", "amber team")])
def test_evaluate_matches_a_forward_per_example_and_label(tiny_lora, tokenizer, labels):
    randomize_lora_b(tiny_lora, 3)
    generated = builtin_task.generate(24, seed=1)
    words = dict(zip(("red", "blue", "green", "amber"), labels, strict=True))
    rows = [{"text": r["text"], "label": words[r["label"]]} for r in generated]
    task = data.Task("t", "classification", builtin_task.INSTRUCTION, tuple(sorted(labels)),
                     tuple(rows))
    examples = data.tokenize(rows, task, tokenizer, max_length=96)
    result = evaluate(tiny_lora.model, examples, task, tokenizer, batch_size=5)
    accuracy, loss, f1, label_loss = _reference(tiny_lora.model, examples, task, tokenizer)
    assert result.accuracy == accuracy
    assert result.macro_f1 == pytest.approx(f1, rel=1e-12)
    assert result.loss == pytest.approx(loss, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-4)
    assert 0 < result.accuracy < 1  # a random adapter: some right, some wrong
    if labels[0] == "red":  # one token per label: the loss train.loss = "label" trains
        assert result.label_loss == pytest.approx(label_loss, rel=1e-4)
    else:
        assert result.label_loss is None


def test_evaluate_generation_reports_loss_only(tiny_lora, tokenizer):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    task = data.Task("g", "generation", "", (), tuple(rows))
    examples = data.tokenize(rows, task, tokenizer, max_length=64)
    result = evaluate(tiny_lora.model, examples, task, tokenizer, batch_size=4)
    _, loss, _, _ = _reference(tiny_lora.model, examples, task, tokenizer)
    assert result.accuracy is None and result.macro_f1 is None and result.loss == pytest.approx(loss, rel=1e-4)
    # the standard error of the mean loss: the sample sd of the per-example losses over sqrt(n)
    losses = [-_log_probs(tiny_lora.model, e.prompt, e.answer).mean().item() for e in examples]
    assert result.loss_se == pytest.approx(statistics.stdev(losses) / math.sqrt(len(losses)),
                                           rel=1e-3)
    assert evaluate(tiny_lora.model, examples[:1], task, tokenizer).loss_se is None
    assert result.losses == pytest.approx(losses, rel=1e-4)  # in the examples' order


def test_loss_drop_has_the_paired_standard_error(tiny_lora, tokenizer):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(9)]
    task = data.Task("g", "generation", "", (), tuple(rows))
    examples = data.tokenize(rows, task, tokenizer, max_length=64)
    before = evaluate(tiny_lora.model, examples, task, tokenizer, batch_size=4)
    randomize_lora_b(tiny_lora, 5)
    after = evaluate(tiny_lora.model, examples, task, tokenizer, batch_size=4)
    diffs = [b - a for b, a in zip(before.losses, after.losses, strict=True)]
    drop, se = loss_drop(before, after)
    assert drop == pytest.approx(statistics.mean(diffs), rel=1e-4)
    assert se == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(diffs)), rel=1e-6)
    assert loss_drop(before, dataclasses.replace(after, losses=()))[1] is None
    assert "losses" not in after.published() and after.published()["loss_se"] == after.loss_se


def test_majority_share_is_the_most_common_labels_fraction():
    assert majority_share(["a", "b", "a", "c"]) == 0.5
    assert majority_share(["a", None, "a"]) == 1.0  # unlabelled (generation) rows are skipped
    assert majority_share([None, None]) is None


def test_macro_f1_on_an_imbalanced_example_worked_by_hand():
    # gold: 6 x label 0, 2 x label 1; the model always says 0.
    # label 0: TP 6, FP 2, FN 0 -> F1 = 12/14; label 1: TP 0 -> F1 0; mean 6/14.
    assert macro_f1([0] * 6 + [1] * 2, [0] * 8, num_labels=3) == pytest.approx(6 / 14)
    assert macro_f1([0, 1, 2], [0, 1, 2], num_labels=3) == 1.0
    # accuracy 0.75 but macro-F1 far lower: why it sits beside accuracy for imbalanced tasks
    assert macro_f1([0] * 6 + [1] * 2, [0] * 8, 3) < 0.75


def test_label_loss_is_cross_entropy_over_the_label_words_only(tiny_lora, tokenizer):
    """train.loss = "label": per example, -log softmax over the 4 label tokens' full-forward
    logits at the first answer position, gold = its label (independent reference below)."""
    randomize_lora_b(tiny_lora, 3)
    rows = builtin_task.generate(9, seed=2)
    task = data.Task("t", "classification", builtin_task.INSTRUCTION,
                     ("amber", "blue", "green", "red"), tuple(rows))
    examples = data.tokenize(rows, task, tokenizer, max_length=96)
    columns = training_label_tokens(task, tokenizer, label_only=True)
    got = per_example_loss(tiny_lora.model, data.collate(examples, tokenizer.pad_token_id), columns)
    for e, loss in zip(examples, got, strict=True):
        logits = tiny_lora.model(input_ids=torch.tensor([list(e.prompt)])).logits[0, -1].float()
        four = logits[list(columns)].log_softmax(-1)
        assert loss.item() == pytest.approx(-four[task.labels.index(e.label)].item(), rel=1e-4)
    answer = per_example_loss(tiny_lora.model, data.collate(examples, tokenizer.pad_token_id))
    assert not torch.allclose(answer, got)  # the default loss is the whole-vocabulary one


def test_label_loss_needs_one_distinct_token_per_label(tokenizer):
    one = data.Task("t", "classification", "", ("red", "blue"), ())
    assert training_label_tokens(one, tokenizer, label_only=False) == ()
    assert len(training_label_tokens(one, tokenizer, label_only=True)) == 2
    long = data.Task("t", "classification", "", ("red team", "blue team"), ())
    with pytest.raises(DataError, match="one distinct token.*'red team': 2.*train.loss = 'answer'"):
        training_label_tokens(long, tokenizer, label_only=True)
    generation = data.Task("g", "generation", "", (), ())
    with pytest.raises(DataError, match="needs a classification task"):
        training_label_tokens(generation, tokenizer, label_only=True)
