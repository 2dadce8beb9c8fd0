"""Evaluate a (LoRA-adapted) causal LM: label log-likelihood accuracy, answer loss, perplexity."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from privlora.data import Batch, Example, Task, collate
from privlora.errors import DataError
from privlora.lm import answer_logits, answer_loss, device_of, first_answer_rows


@dataclass(frozen=True)
class EvalResult:
    """Metrics on an eval set; accuracy and macro-F1 are None for generation tasks."""

    accuracy: float | None
    loss: float
    perplexity: float
    examples: int
    macro_f1: float | None = None  # mean over the task's labels of per-label F1 (imbalanced tasks)
    # cross-entropy over the label words only (one-token labels): what train.loss = "label" trains
    label_loss: float | None = None
    # the standard error of ``loss`` over the examples (sample sd / sqrt(n); None for one)
    loss_se: float | None = None
    # each example's answer loss, in the order of the examples: for the paired error of a
    # change between two evaluations of the same set (``loss_drop``); never published
    losses: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def published(self) -> dict:
        """The metrics as summary.json and ``privlora eval`` print them: all but ``losses``."""
        return {k: v for k, v in asdict(self).items() if k != "losses"}


# a model that beats its floor on the server's eval set by no more than this many standard
# errors has shown no progress (federation.stop_on_noise)
PROGRESS_MARGIN = 2.0


def progress_margin(zero_shot: EvalResult, result: EvalResult, majority: float | None) -> float:
    """Return by how many standard errors ``result`` beats its floor on the same eval set.

    Classification: accuracy over the floor, the larger of zero-shot and always answering the
    most common label (``floor_margin``: a model that only learned the label prior has not
    progressed). Generation: the fall in answer loss from zero-shot over its paired standard
    error (``loss_drop``), else over the two losses' errors combined (``drop_error``).
    """
    if result.accuracy is not None and zero_shot.accuracy is not None:
        return floor_margin(result.accuracy, max(zero_shot.accuracy, majority or 0.0),
                            result.examples)
    drop, paired = loss_drop(zero_shot, result)
    return margin(drop, drop_error(paired, zero_shot.loss_se, result.loss_se))


def margin(gain: float, se: float | None) -> float:
    """Return ``gain`` in standard errors; where the error is 0 or unknown, inf for a gain and
    0 otherwise (nothing to judge it by)."""
    if not se:
        return math.inf if gain > 0 else 0.0
    return gain / se


def floor_margin(accuracy: float, floor: float, examples: int) -> float:
    """Return how many standard errors ``accuracy`` on ``examples`` lies above ``floor``, the
    error being that of a model that scores the floor: sqrt(floor (1 - floor) / examples)."""
    return margin(accuracy - floor, math.sqrt(floor * (1 - floor) / examples))


def drop_error(paired: float | None, before: float | None, after: float | None) -> float | None:
    """Return the standard error of a fall in loss: the paired one (``loss_drop``) where known,
    else the two losses' own errors combined, sqrt(before^2 + after^2), which errs high (the
    same examples' losses go together); None where neither is known."""
    if paired is not None:
        return paired
    return None if before is None or after is None else math.hypot(before, after)


def loss_drop(before: EvalResult, after: EvalResult) -> tuple[float, float | None]:
    """Return how far the answer loss fell from ``before`` to ``after`` (two evaluations of the
    same examples) and its standard error from the per-example differences, which is far
    smaller than either loss's own error when the examples' losses go together; None without
    per-example losses for both or with fewer than two examples."""
    drop = before.loss - after.loss
    pairs = list(zip(before.losses, after.losses, strict=False))
    if len(pairs) < 2 or len(before.losses) != len(after.losses):
        return drop, None
    diffs = torch.tensor([b - a for b, a in pairs], dtype=torch.float64)
    return drop, (diffs.std() / math.sqrt(len(pairs))).item()


def macro_f1(gold: Sequence[int], predicted: Sequence[int], num_labels: int) -> float:
    """Return the unweighted mean of per-label F1 = 2TP / (2TP + FP + FN).

    The mean runs over the labels that occur in ``gold`` or ``predicted`` (scikit-learn's
    ``f1_score(average="macro")`` default); a label seen on neither side is left out.
    """
    scores = []
    for label in range(num_labels):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


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


def training_label_tokens(task: Task, tokenizer: PreTrainedTokenizerBase,
                          label_only: bool) -> tuple[int, ...]:
    """Return the label tokens a ``train.loss = "label"`` run trains over (``label_only``;
    () for "answer").

    Each label must be one token, distinct from the others: the loss is a softmax over them.
    """
    if not label_only:
        return ()
    if not task.classifies:
        raise DataError("train.loss = 'label' needs a classification task; this one is "
                        f"{task.kind!r}: set train.loss = 'answer'")
    ids = label_token_ids(task.labels, tokenizer)
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        shown = {label: len(i) for label, i in zip(task.labels, ids)}
        raise DataError("train.loss = 'label' needs every label to be one distinct token; "
                        f"tokens per label: {shown}; set train.loss = 'answer'")
    return tuple(i[0] for i in ids)


@torch.no_grad()
def evaluate(model, examples: list[Example], task: Task, tokenizer: PreTrainedTokenizerBase,
             batch_size: int = 32) -> EvalResult:
    """Score ``examples``: mean answer loss, perplexity and (classification) label accuracy.

    One forward per example serves both: the loss reads the logits at the answer positions, and
    with single-token labels the label scores are the log-probabilities at the first of them
    (where the gold label's first token is predicted). Examples are batched in order of length,
    so little is spent on padding. Multi-token labels take one more forward per label.
    """
    model.eval()
    label_ids = label_token_ids(task.labels, tokenizer) if task.classifies else []
    gold = _gold(examples, task) if label_ids else torch.empty(0)
    single = all(len(ids) == 1 for ids in label_ids)
    columns = [ids[0] for ids in label_ids]
    pad, device = tokenizer.pad_token_id, device_of(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt)
                   + len(examples[i].answer))
    losses, label_losses = [], []
    predicted = torch.zeros(len(examples), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        batch = collate([examples[i] for i in picked], pad).to(device)
        logits = answer_logits(model, batch)  # (answer tokens, V)
        losses.append(answer_loss(logits, batch))
        if not label_ids:
            continue
        if single:  # (B, V) at the first answer position -> (B, labels)
            scores = label_log_probs_at_start(logits, batch, columns)
            among = scores.log_softmax(dim=1)  # renormalised over the labels alone
            label_losses.append(-among.gather(1, gold[picked][:, None].to(among.device))[:, 0])
        else:
            scores = label_scores(model, [examples[i].prompt for i in picked], label_ids, pad)
        predicted[picked] = scores.argmax(dim=1).cpu()
    per_example = torch.empty(len(examples))
    per_example[order] = torch.cat(losses).float().cpu()
    loss = per_example.mean().item()
    loss_se = (per_example.std() / math.sqrt(len(examples))).item() if len(examples) > 1 else None
    perplexity = math.exp(min(loss, 50.0))
    each = tuple(per_example.tolist())
    if not label_ids:
        return EvalResult(None, loss, perplexity, len(examples), loss_se=loss_se, losses=each)
    accuracy = int((predicted == gold).sum()) / len(examples)
    f1 = macro_f1(gold.tolist(), predicted.tolist(), len(task.labels))
    label_loss = torch.cat(label_losses).mean().item() if label_losses else None
    return EvalResult(accuracy, loss, perplexity, len(examples), f1, label_loss, loss_se, each)


def label_log_probs_at_start(logits: torch.Tensor, batch: Batch,
                             columns: Sequence[int]) -> torch.Tensor:
    """Return, from ``answer_logits``, each example's log-probability of each label's (first)
    token at its first answer position: (B, labels), not renormalised over the labels."""
    return logits[first_answer_rows(batch)].log_softmax(dim=-1)[:, list(columns)]


def _gold(examples: list[Example], task: Task) -> torch.Tensor:
    """Return each example's label index; refuse a label the task does not have."""
    for e in examples:
        if e.label not in task.labels:
            raise DataError(
                f"eval label {e.label!r} is not one the model was trained on {list(task.labels)}; "
                "evaluate on data with the training labels"
            )
    return torch.tensor([task.labels.index(e.label) for e in examples])


def label_scores(model, prompts: list[tuple[int, ...]], label_ids: list[list[int]],
                 pad_id: int) -> torch.Tensor:
    """Return log p(label tokens | prompt) for every prompt and label: (B, L), one scored
    continuation per label (for labels of several tokens)."""
    columns = []
    for ids in label_ids:
        batch = collate([Example(p, tuple(ids), None) for p in prompts], pad_id)
        batch = batch.to(device_of(model))
        logprobs = answer_logits(model, batch).log_softmax(dim=-1)
        token_lp = logprobs.gather(1, batch.targets[batch.target_mask][:, None])[:, 0]
        rows = batch.target_mask.nonzero()[:, 0]
        columns.append(torch.zeros(len(prompts), device=token_lp.device).index_add(0, rows,
                                                                                   token_lp))
    return torch.stack(columns, dim=1)
