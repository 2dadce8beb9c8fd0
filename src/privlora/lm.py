"""Answer-only forward passes: run the decoder, apply the LM head only where answers are scored.

Why: the 49k-token vocabulary head on every position is most of the waste for short answers;
computing logits only at answer positions keeps the loss identical and the cost small.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from privlora import import_peft_without_bitsandbytes

import_peft_without_bitsandbytes()  # whichever module imports PEFT first

from peft import PeftModel
from transformers import PreTrainedModel

from privlora.architectures import finish_logits
from privlora.data import Batch
from privlora.errors import ConfigError, DataError


@dataclass(frozen=True)
class OffsetModel:
    """The server's model under ``quantization.transfer = "logits"`` (proxy tuning, Liu et al.
    2024): the full-precision base's log-probabilities plus what the adapter changes on the
    quantized base the clients trained on,

        log p_full(x) + log p_quantized+adapter(x) - log p_quantized(x)

    (renormalised by whatever softmax reads them). ``full`` is scored with its LoRA layers
    disabled, ``quantized`` with and without the global adapter: three forwards per batch.
    """

    full: PeftModel  # the server's full-precision base (its LoRA layers are switched off)
    quantized: PeftModel  # the clients' base with the global adapter written into its LoRA

    def eval(self) -> OffsetModel:
        self.full.eval()
        self.quantized.eval()
        return self


def causal_lm(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """Return the underlying causal LM (with any LoRA layers injected) of a PEFT or HF model."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def device_of(model: PreTrainedModel | PeftModel | OffsetModel) -> torch.device:
    """Return the device the model's weights live on (batches are moved there)."""
    if isinstance(model, OffsetModel):
        return device_of(model.full)
    return causal_lm(model).get_input_embeddings().weight.device


def autocast_for(model: PreTrainedModel | PeftModel) -> contextlib.AbstractContextManager:
    """Return bf16 autocast when the base weights are bf16 (so the float32 LoRA factors run in
    bf16 too), on the model's device type; else a no-op."""
    weight = causal_lm(model).get_input_embeddings().weight
    if weight.dtype == torch.bfloat16:
        return torch.autocast(weight.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def hidden_states(model: PreTrainedModel | PeftModel, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Run the decoder stack only: (B, T) ids -> (B, T, H) final hidden states."""
    decoder = causal_lm(model).get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]


def head_logits(model: PreTrainedModel | PeftModel, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head, and what the family does after it, to hidden states: (N, H) -> (N, V)."""
    causal = causal_lm(model)
    return finish_logits(causal.config, causal.get_output_embeddings()(hidden))  # (N,H)@(H,V)


def answer_logits(model: PreTrainedModel | PeftModel | OffsetModel,
                  batch: Batch) -> torch.Tensor:
    """Return float32 logits at the positions marked by ``batch.target_mask``: (N, V)."""
    if isinstance(model, OffsetModel):
        return offset_logits(model, batch)
    with autocast_for(model):
        hidden = hidden_states(model, batch.input_ids, batch.attention_mask)
        logits = head_logits(model, hidden[batch.target_mask])
    return logits.float()


def offset_logits(model: OffsetModel, batch: Batch) -> torch.Tensor:
    """Return the ``OffsetModel``'s log-probabilities at the answer positions: (N, V)."""
    with model.full.disable_adapter():
        full = answer_logits(model.full, batch).log_softmax(dim=-1)
    tuned = answer_logits(model.quantized, batch).log_softmax(dim=-1)
    with model.quantized.disable_adapter():
        untuned = answer_logits(model.quantized, batch).log_softmax(dim=-1)
    return full + tuned - untuned


@torch.no_grad()
def check_answer_path(model: PreTrainedModel, name: str) -> None:
    """Refuse a model whose own logits this module's decoder-then-head path does not reproduce
    (a family with an unknown step after its head), naming its model_type.

    Why: training and evaluation use that path; a mismatch would train one function and
    release an adapter for another. One forward of 8 tokens.
    """
    weight = model.get_input_embeddings().weight
    ids = torch.arange(1, 9, device=weight.device)[None, :] % weight.shape[0]  # (1, 8)
    mask = torch.ones_like(ids)
    kind = model.config.model_type
    try:
        with autocast_for(model):
            theirs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            ours = head_logits(model, hidden_states(model, ids, mask)).float()
    except (AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"model.name = {name!r} ({kind!r}): privlora cannot run its decoder "
                          f"and head apart ({type(err).__name__}: {str(err)[:120]})") from None
    # float32 agrees to rounding; bf16 and fp16 to about a step of the largest logit
    tolerance = 1e-4 if weight.dtype == torch.float32 else 3e-2
    gap = float((ours - theirs).abs().max())
    if not gap <= tolerance * max(1.0, float(theirs.abs().max())):
        raise ConfigError(f"model.name = {name!r} ({kind!r}): its logits differ from its decoder "
                          f"and LM head's by {gap:.3g}, a step after the head privlora does not "
                          "know (architectures.finish_logits); this family is not supported yet")


def per_example_loss(model: PreTrainedModel | PeftModel, batch: Batch,
                     label_tokens: tuple[int, ...] = ()) -> torch.Tensor:
    """Return each example's training loss: (B,).

    Without ``label_tokens``: its mean cross-entropy over its answer tokens (whole vocabulary).
    With them (a classification task's label tokens): its cross-entropy over those tokens only,
    at its first answer position, whose target must be one of them (``label_loss``).
    """
    if label_tokens:
        return label_loss(model, batch, label_tokens)
    return answer_loss(answer_logits(model, batch), batch)


def label_loss(model: PreTrainedModel | PeftModel, batch: Batch,
               label_tokens: tuple[int, ...]) -> torch.Tensor:
    """Return each example's cross-entropy over the label tokens at its first answer position.

    The softmax runs over ``len(label_tokens)`` head rows instead of the vocabulary: the loss is
    the one eval's argmax over the labels ranks by, so under DP the clipped gradient spends
    nothing on the answer's end token or on words that are not labels.
    """
    first = first_answer_rows(batch)
    gold = batch.targets[batch.target_mask][first]  # each example's first answer token
    columns = torch.tensor(label_tokens, device=gold.device)
    hit = gold[:, None] == columns[None, :]  # (B, labels)
    if not bool(hit.any(dim=1).all()):
        raise DataError("an answer does not start with one of the label tokens; "
                        "train.loss = 'label' needs answers that are the task's labels")
    with autocast_for(model):
        hidden = hidden_states(model, batch.input_ids, batch.attention_mask)
        head = causal_lm(model).get_output_embeddings()
        rows = hidden[batch.target_mask][first]  # (B, H) at each first answer position
        logits = F.linear(rows, head.weight[columns],
                          None if head.bias is None else head.bias[columns])
        logits = finish_logits(causal_lm(model).config, logits)  # elementwise: any columns
    return F.cross_entropy(logits.float(), hit.float().argmax(dim=1), reduction="none")


def first_answer_rows(batch: Batch) -> torch.Tensor:
    """Return, per example, the row of ``answer_logits`` at its first answer position: (B,).

    The rows follow ``target_mask`` in row-major order, so example b's rows start after the
    answer positions of examples 0..b-1.
    """
    counts = batch.target_mask.sum(dim=1)
    return torch.cumsum(counts, dim=0) - counts


def answer_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Return each example's mean cross-entropy over its answer tokens from ``answer_logits``."""
    token_loss = F.cross_entropy(logits, batch.targets[batch.target_mask], reduction="none")
    rows = batch.target_mask.nonzero()[:, 0]  # which example each answer token belongs to
    sums = torch.zeros(batch.input_ids.shape[0], device=logits.device).index_add(0, rows,
                                                                                 token_loss)
    counts = batch.target_mask.sum(dim=1).clamp(min=1)
    return sums / counts
