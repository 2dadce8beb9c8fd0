"""Per-example gradients of the LoRA factors from one backward pass, for DP-SGD.

A Linear y = x W^T used at every position t has dL/dW = sum_t g_t x_t^T, where g = dL/dy. When
the loss is a SUM of per-example losses, example b's gradient is sum_t g_{b,t} x_{b,t}^T
(Goodfellow, 2015, "Efficient per-example gradient computations"; the same trick as Opacus's
grad samplers). A forward hook passes each LoRA Linear's output through an identity autograd
function that saves the Linear's input; its backward receives g and contracts the two right away,
so no loop over examples is needed.

Why a saved tensor and not a closure: under gradient checkpointing (non-reentrant), tensors saved
for backward inside a checkpointed layer are dropped after the forward and recomputed in the
backward, so the input costs memory only while its layer is in the backward. Held in a Python
closure instead, every adapted layer's input stayed alive from the forward to the backward: a DP
step with checkpointing then needed about twice the memory of a non-private one (bench/model_size.py).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Self

import torch
from torch import Tensor, nn

from privlora.lora import LoraHandles, lora_linears


class PerExampleGrads:
    """Record per-example gradients of every lora_A / lora_B weight while the context is open.

    Usage::

        with PerExampleGrads(handles, train_a=True) as tracker:
            loss = per_example_losses.sum()   # a SUM, so each example's gradient is its own
            loss.backward()
            grads = tracker.collect()         # {"<layer>.lora_A": (B, r, in), ...}

    The state is real (hooks and the gradients they accumulate), hence a class. Works under
    ``torch.autocast``: activations and output gradients are cast to float32 before contracting.
    """

    def __init__(self, handles: LoraHandles, train_a: bool = True) -> None:
        self._targets: dict[str, nn.Linear] = {}
        for layer, (lora_a, lora_b) in lora_linears(handles).items():
            if train_a:
                self._targets[f"{layer}.lora_A"] = lora_a
            self._targets[f"{layer}.lora_B"] = lora_b
        for name, linear in self._targets.items():
            if linear.bias is not None:
                raise ValueError(
                    f"{name} has a bias; per-example gradients cover LoRA weights only. "
                    "Attach LoRA with bias='none' (lora.attach does)"
                )
        self._grads: dict[str, Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Self:
        frozen = [name for name, linear in self._targets.items() if not linear.weight.requires_grad]
        if frozen:
            raise ValueError(
                f"{frozen[:3]} do not require grad, so no gradient would reach them; call "
                "lora.set_trainable(handles, train_a=...) with the same train_a first"
            )
        for name, linear in self._targets.items():
            self._hooks.append(linear.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._grads.clear()

    def collect(self) -> dict[str, Tensor]:
        """Return and clear the per-example gradients accumulated since the last collect.

        Keys follow ``lora.flatten``: ``"<layer>.lora_A"`` (B, r, in), ``"<layer>.lora_B"``
        (B, out, r), in sorted order. Call after ``loss.backward()`` with a summed loss.
        """
        missing = sorted(set(self._targets) - set(self._grads))
        if missing:
            raise RuntimeError(
                f"no gradient reached {missing[:3]}; run the forward and loss.backward() "
                "inside the PerExampleGrads context before collect()"
            )
        grads = {name: self._grads[name] for name in sorted(self._targets)}
        self._grads = {}
        return grads

    def _forward_hook(self, name: str) -> Callable[[nn.Module, tuple, Tensor], Tensor | None]:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if not output.requires_grad:  # e.g. an evaluation forward under torch.no_grad
                return None
            return _OnOutputGrad.apply(output, inputs[0].detach(), self._accumulator(name))

        return hook

    def _accumulator(self, name: str) -> Callable[[Tensor, Tensor], None]:
        def accumulate(activation: Tensor, grad_output: Tensor) -> None:
            batch = activation.shape[0]
            x = activation.float().reshape(batch, -1, activation.shape[-1])  # (B, T, in)
            g = grad_output.float().reshape(batch, -1, grad_output.shape[-1])  # (B, T, out)
            per_example = torch.einsum("bto,bti->boi", g, x)  # (B, out, in)
            # Why: a module used more than once per forward (or several backwards before a
            # collect) gets the sum of its uses, exactly as autograd sums into .grad.
            previous = self._grads.get(name)
            if previous is None:
                self._grads[name] = per_example
            elif previous.shape != per_example.shape:
                raise RuntimeError(
                    f"{name}: batch of {batch} examples after an uncollected batch of "
                    f"{previous.shape[0]}; call collect() after each backward"
                )
            else:
                self._grads[name] = previous + per_example

        return accumulate


class _OnOutputGrad(torch.autograd.Function):
    """Identity on a Linear's output whose backward hands (the Linear's input, the output's
    gradient) to a callback. The input is saved with ``save_for_backward``, so gradient
    checkpointing drops and recomputes it like any other activation of its layer."""

    @staticmethod
    def forward(ctx, output: Tensor, activation: Tensor,
                callback: Callable[[Tensor, Tensor], None]) -> Tensor:
        ctx.save_for_backward(activation)
        ctx.callback = callback
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (activation,) = ctx.saved_tensors
        ctx.callback(activation, grad_output)
        return grad_output, None, None
