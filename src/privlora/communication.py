"""Measure what crosses the wire: payloads serialized as safetensors (names, shapes, dtypes)."""

from __future__ import annotations

import torch
from safetensors.torch import save as safetensors_save

from privlora.architectures import full_shape


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Return the size in bytes of ``tensors`` serialized as one safetensors payload."""
    return len(safetensors_save({k: v.detach().contiguous() for k, v in tensors.items()}))


def full_finetune_bytes(model: torch.nn.Module) -> int:
    """Return the bytes of one full-model update in float32, serialized tensor by tensor.

    Why tensor by tensor: serializing 135M float32 parameters at once would hold two extra copies
    of the model in memory; per-tensor payloads add only a ~100-byte header each.
    """
    seen: set[int] = set()
    total = 0
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        shape = full_shape(param)  # an NF4 weight holds packed codes: count the full tensor
        full = param.detach() if shape == param.shape else torch.zeros(shape)
        total += payload_bytes({name: full.float().cpu()})
    return total
