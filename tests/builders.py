"""The builders the tests share: random LoRA adapters, random updates shaped like a payload, and
the tiny random Llama (with LoRA). The fixtures in conftest.py build through these; a test module
imports them as ``from tests.builders import ...``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from privlora import protocol
from privlora.lora import Adapter, Factors, LoraSpec, attach, lora_linears
from privlora.models import tiny_random_llama
from privlora.protocol import Payload
from privlora.rules import FedAvg

Shapes = Mapping[str, tuple[int, int]]  # layer name: (out, in)


def generator(seed: int | torch.Generator) -> torch.Generator:
    """``seed`` itself when it is a generator (its draws go on), else a fresh one seeded with it."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def random_adapter(shapes: Shapes, seed: int | torch.Generator, rank: int = 4) -> Adapter:
    """Standard-normal factors per layer, drawn layer by layer in order: A (rank x in), then
    B (out x rank)."""
    return _draw({name: ((rank, d_in), (d_out, rank)) for name, (d_out, d_in) in shapes.items()},
                 seed)


def random_adapter_like(adapter: Adapter, seed: int | torch.Generator) -> Adapter:
    """A random adapter of the factor shapes of ``adapter``, drawn as ``random_adapter`` draws."""
    return _draw({name: (f.A.shape, f.B.shape) for name, f in adapter.items()}, seed)


def _draw(factor_shapes: Mapping[str, tuple], seed: int | torch.Generator) -> Adapter:
    gen = generator(seed)
    return {name: Factors(A=torch.randn(a, generator=gen), B=torch.randn(b, generator=gen))
            for name, (a, b) in factor_shapes.items()}


def sent_payload(shapes: Shapes, rank: int = 4, seed: int = 0) -> Payload:
    """What the server sends under FedAvg: the downlink of ``random_adapter(shapes, seed)``."""
    return protocol.downlink(FedAvg(), random_adapter(shapes, seed, rank), None)


def random_like(tensors: Mapping[str, torch.Tensor], gen: torch.Generator,
                scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``scale`` times standard-normal tensors of the shapes of ``tensors`` (an update, a delta)."""
    return {k: scale * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}


def randomize_lora_b(handles, seed: int | torch.Generator, scale: float = 1.0) -> None:
    """Give every lora_B of a LoRA model random values (``scale`` times standard normal): with
    B = 0 (PEFT's init) the gradient of A is zero."""
    gen = generator(seed)
    with torch.no_grad():
        for _, lora_b in lora_linears(handles).values():
            lora_b.weight.copy_(torch.randn(lora_b.weight.shape, generator=gen) * scale)


def tiny_llama(tokenizer) -> torch.nn.Module:
    """A fresh 2-layer random Llama (seed 0) in float32 with frozen base weights."""
    model = tiny_random_llama(vocab_size=len(tokenizer))
    model.requires_grad_(False)
    return model


def with_lora(model: torch.nn.Module):
    """``model`` wrapped with LoRA r=4 on q_proj and v_proj (seed 0)."""
    return attach(model, LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), seed=0)


def live_activations(width: int) -> int:
    """How many (batch, tokens, width) tensors Python can still reach (after a collection)."""
    import gc

    gc.collect()
    return sum(1 for obj in gc.get_objects()
               if isinstance(obj, torch.Tensor) and obj.dim() == 3 and obj.shape[-1] == width)
