"""Per-example LoRA gradients from one backward, pinned against a brute-force loop over examples."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from privlora.lora import lora_linears, set_trainable
from privlora.models import gradient_checkpointing
from privlora.privacy.mechanisms import clip_per_example, joint_l2_norm
from privlora.privacy.per_example import PerExampleGrads
from tests.builders import live_activations, randomize_lora_b

LENGTHS = [9, 5, 12, 7]  # different lengths, so the batch is right-padded
N_TARGETS = 3  # the loss covers each example's last N_TARGETS tokens


def _batch(vocab: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    width = max(LENGTHS)
    ids = torch.full((len(LENGTHS), width), pad_id)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    labels = torch.full((len(LENGTHS), width), -100)
    for b, length in enumerate(LENGTHS):
        ids[b, :length] = torch.randint(3, vocab, (length,), generator=g)
        mask[b, :length] = 1
        labels[b, length - N_TARGETS : length] = ids[b, length - N_TARGETS : length]
    return ids, mask, labels


def _per_example_losses(model, ids, mask, labels) -> torch.Tensor:
    """Return each example's summed cross-entropy on its target tokens, shape (B,)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    token_losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(targets.shape)
    return token_losses.sum(dim=1)


def _brute_force(handles, ids, mask, labels, train_a: bool) -> dict[str, torch.Tensor]:
    """Run one backward per example on its unpadded tokens and stack the .grad of each weight."""
    params = {}
    for layer, (lora_a, lora_b) in lora_linears(handles).items():
        if train_a:
            params[f"{layer}.lora_A"] = lora_a.weight
        params[f"{layer}.lora_B"] = lora_b.weight
    grads = {name: [] for name in params}
    for b, length in enumerate(LENGTHS):
        for p in params.values():
            p.grad = None
        loss = _per_example_losses(
            handles.model,
            ids[b : b + 1, :length],
            mask[b : b + 1, :length],
            labels[b : b + 1, :length],
        ).sum()
        loss.backward()
        for name, p in params.items():
            grads[name].append(p.grad.detach().clone())
    for p in params.values():
        p.grad = None
    return {name: torch.stack(g) for name, g in sorted(grads.items())}


@pytest.mark.parametrize("train_a", [True, False])
def test_per_example_grads_match_a_loop_over_examples(tiny_lora, tokenizer, train_a):
    randomize_lora_b(tiny_lora, 5, 0.5)
    set_trainable(tiny_lora, train_a=train_a)
    ids, mask, labels = _batch(len(tokenizer), tokenizer.pad_token_id)
    expected = _brute_force(tiny_lora, ids, mask, labels, train_a)

    with PerExampleGrads(tiny_lora, train_a=train_a) as tracker:
        _per_example_losses(tiny_lora.model, ids, mask, labels).sum().backward()
        grads = tracker.collect()

    assert list(grads) == list(expected)
    suffixes = {name.rsplit(".", 1)[1] for name in grads}
    assert suffixes == ({"lora_A", "lora_B"} if train_a else {"lora_B"})
    for name in expected:
        assert grads[name].shape == expected[name].shape
        assert grads[name].shape[0] == len(LENGTHS)
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-5)
    assert all(torch.count_nonzero(g) > 0 for g in grads.values())

    clip_norm = 0.5 * min(joint_l2_norm({k: v[b] for k, v in expected.items()}) for b in range(4))
    summed, norms = clip_per_example(grads, clip_norm)
    expected_sum = {k: torch.zeros_like(v[0]) for k, v in expected.items()}
    for b in range(len(LENGTHS)):
        example = {k: v[b] for k, v in expected.items()}
        factor = min(1.0, clip_norm / joint_l2_norm(example))
        # the hook path and the loop round differently in float32: compare at float32's scale
        assert norms[b].item() == pytest.approx(joint_l2_norm(example), rel=1e-4)
        for k in expected_sum:
            expected_sum[k] += example[k] * factor
        clipped_alone, _ = clip_per_example({k: v[b : b + 1] for k, v in grads.items()}, clip_norm)
        assert joint_l2_norm(clipped_alone) <= clip_norm
    for k, value in expected_sum.items():
        torch.testing.assert_close(summed[k], value, rtol=1e-4, atol=1e-5)


def test_per_example_grads_sum_to_the_batch_gradient_under_bf16_autocast(tiny_model, tokenizer):
    from privlora.lora import LoraSpec, attach

    handles = attach(tiny_model.to(torch.bfloat16), LoraSpec(rank=4, alpha=8), seed=0)
    randomize_lora_b(handles, 5, 0.5)
    set_trainable(handles, train_a=True)
    ids, mask, labels = _batch(len(tokenizer), tokenizer.pad_token_id)
    with PerExampleGrads(handles) as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _per_example_losses(handles.model, ids, mask, labels).sum()
        loss.backward()
        grads = tracker.collect()
    for layer, (lora_a, lora_b) in lora_linears(handles).items():
        for suffix, weight in (("lora_A", lora_a.weight), ("lora_B", lora_b.weight)):
            per_example = grads[f"{layer}.{suffix}"]
            assert per_example.dtype == torch.float32
            assert per_example.shape == (len(LENGTHS), *weight.shape)
            batch = weight.grad.float()
            # bf16 rounds the batch gradient's matmul; allow a few bf16 ulps of its scale.
            err = (per_example.sum(0) - batch).norm() / batch.norm()
            assert err < 3e-2, f"{layer}.{suffix}: relative error {err:.3g}"


def test_collect_clears_and_hooks_leave_with_the_context(tiny_lora, tokenizer):
    randomize_lora_b(tiny_lora, 5, 0.5)
    set_trainable(tiny_lora, train_a=True)
    ids, mask, labels = _batch(len(tokenizer), tokenizer.pad_token_id)
    tracker = PerExampleGrads(tiny_lora)
    with tracker:
        with pytest.raises(RuntimeError, match="no gradient reached"):
            tracker.collect()
        with torch.no_grad():  # an evaluation forward records nothing
            _per_example_losses(tiny_lora.model, ids, mask, labels)
        with pytest.raises(RuntimeError, match="no gradient reached"):
            tracker.collect()
        _per_example_losses(tiny_lora.model, ids, mask, labels).sum().backward()
        first = tracker.collect()
        with pytest.raises(RuntimeError, match="no gradient reached"):
            tracker.collect()
    for lora_a, lora_b in lora_linears(tiny_lora).values():
        assert not lora_a._forward_hooks and not lora_b._forward_hooks
    assert len(first) == 2 * len(lora_linears(tiny_lora))


def test_entering_with_frozen_factors_fails_loudly(tiny_lora):
    set_trainable(tiny_lora, train_a=False)  # A frozen, as in FFA-LoRA
    with pytest.raises(ValueError, match="set_trainable"), PerExampleGrads(tiny_lora, train_a=True):
        pass
    with PerExampleGrads(tiny_lora, train_a=False):  # B only: fine
        pass


def test_under_checkpointing_the_hooks_keep_no_activation_alive(tiny_lora):
    """Why: gradient checkpointing drops a layer's activations after its forward; the
    per-example hooks must not hold the adapted layers' inputs until the backward either, or a
    DP step needs twice the activation memory of a non-private one (bench/model_size.py)."""
    randomize_lora_b(tiny_lora, torch.Generator().manual_seed(3), 0.5)  # else A's gradient is 0
    set_trainable(tiny_lora, train_a=True)
    model = tiny_lora.model
    model.train(True)  # transformers checkpoints in training mode only
    ids = torch.randint(3, model.config.vocab_size, (4, 16),
                        generator=torch.Generator().manual_seed(0))
    width = model.config.hidden_size
    alive = {}
    for tracked in (False, True):
        with gradient_checkpointing(model, True), \
                PerExampleGrads(tiny_lora) if tracked else contextlib.nullcontext() as tracker:
            loss = model(input_ids=ids).logits.sum()
            alive[tracked] = live_activations(width)
            loss.backward()
            if tracked:
                assert all(torch.count_nonzero(g) > 0 for g in tracker.collect().values())
    assert alive[True] == alive[False]
