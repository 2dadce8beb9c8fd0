"""The server's correction of the clients' adapter to its own full-precision base (FedLPP,
``quantization.transfer = "distill"``).

Clients train the global adapter on a quantized copy of the base; on that copy it has learned
the task, but on the server's full-precision weights the same factors can miss (bench/fedlpp.py:
nf4 on Financial PhraseBank, seed 2, 97.0% on the clients' base and 93.0% on the server's). The
server holds both bases, so it can measure what the adapter does on the clients' one and teach
an adapter on its own base to do the same: starting from the global adapter, a few Adam steps
bring the label distribution of (server base + served adapter) to that of (clients' base +
global adapter as sent) on prompts made of public text (``quantization.public_text``), wrapped
in the task's own prompt. Knowledge distillation (Hinton et al. 2015) from the clients' model,
on inputs nobody's data chose.

What it uses: the two models the server already has, the global adapter (already released by
the clients, so this is post-processing: no privacy cost) and the public text. No client data,
no client statistics. The served adapter stays on the server (clients keep training the
global one) and is saved as a standard PEFT adapter for the server's base; one forward per
token to serve, against three for ``transfer = "logits"``.

What the public text must be: public (anyone may read it), in the task's domain (sentences
whose label the task can tell: the FPB measurements used FiQA's public financial posts; plain
encyclopedic text (Dolly's answers), which the clients' model calls "neutral" 98% of the time,
taught the served adapter little but "neutral": 93.0% fell to 89.5%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from privlora.data import Example, collate
from privlora.errors import ConfigError
from privlora.evaluate import label_log_probs_at_start, label_token_ids
from privlora.lm import answer_logits, device_of
from privlora.lora import Adapter, LoraHandles, read_adapter, set_trainable, write_adapter

BATCH = 16  # public prompts per step


@dataclass(frozen=True)
class Distillation:
    """How the server fits its served adapter: steps of Adam on batches of public prompts."""

    steps: int
    lr: float
    batch_size: int
    columns: tuple[int, ...]  # each label's first token: the scores read at the answer start


def label_columns(labels: tuple[str, ...], tokenizer) -> tuple[int, ...]:
    """Return each label's first token, where its score is read; refuse labels that share one."""
    columns = tuple(ids[0] for ids in label_token_ids(labels, tokenizer))
    if len(set(columns)) < len(columns):
        raise ConfigError(f"quantization.transfer = 'distill' reads each label's score at its "
                          f"first token, and the labels {list(labels)} share one; rename the "
                          "labels or use transfer = 'adapter'")
    return columns


def label_log_probs(model, prompts: list[Example], columns: tuple[int, ...],
                    pad_id: int) -> torch.Tensor:
    """Return each prompt's log-probabilities over the labels, read at the first answer
    position from the labels' first tokens and renormalised over them: (B, labels)."""
    batch = collate(prompts, pad_id).to(device_of(model))
    return label_log_probs_at_start(answer_logits(model, batch), batch, columns).log_softmax(dim=1)


def targets(teacher, prompts: list[Example], columns: tuple[int, ...], pad_id: int,
            batch_size: int = 32) -> torch.Tensor:
    """Return the teacher's label log-probabilities on every public prompt: (P, labels)."""
    teacher.eval()
    with torch.no_grad():
        return torch.cat([label_log_probs(teacher, prompts[i : i + batch_size], columns, pad_id)
                          for i in range(0, len(prompts), batch_size)]).cpu()


def distill(student: LoraHandles, start: Adapter, prompts: list[Example], teacher: torch.Tensor,
            how: Distillation, pad_id: int, generator: torch.Generator) -> Adapter:
    """Return the adapter on ``student``'s base whose label distribution on ``prompts`` is
    closest (KL from ``teacher``'s) after ``how.steps`` Adam steps from ``start``; the batches
    are drawn by ``generator``. Both factors train; ``student`` is left holding the result."""
    write_adapter(student, start)
    params = set_trainable(student, train_a=True)
    optimizer = torch.optim.Adam(params, lr=how.lr)
    student.model.eval()  # no dropout: the served model is scored in eval mode
    for _ in range(how.steps):
        picked = torch.randint(len(prompts), (how.batch_size,), generator=generator)
        scores = label_log_probs(student.model, [prompts[i] for i in picked.tolist()],
                                 how.columns, pad_id)
        loss = F.kl_div(scores, teacher[picked].to(scores.device), log_target=True,
                        reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
    return read_adapter(student)

