"""Attach, read and write LoRA adapters through PEFT; save them in stock PEFT format.

An adapter in memory is ``dict[module_path, Factors]``: for each adapted Linear, the pair
A (r, in) and B (out, r) so that the weight update is ``scale * B @ A`` with scale = alpha / r.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from privlora import import_peft_without_bitsandbytes, quiet

import_peft_without_bitsandbytes()

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from privlora.architectures import default_targets
from privlora.config import LoraSection
from privlora.errors import ConfigError

ADAPTER_NAME = "default"
log = logging.getLogger(__name__)
_SUFFIX = {"A": ".lora_A", "B": ".lora_B"}


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA hyper-parameters shared by the server and every client."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    last_layers: int = 0  # adapt only the last k decoder layers; 0 = all

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_of(section: LoraSection, model: PreTrainedModel) -> LoraSpec:
    """Return the LoRA hyper-parameters of a validated ``[lora]`` section for ``model``.

    An empty ``target_modules`` means the model family's default
    (``architectures.default_targets`` of its ``model_type``): a pure function of the config
    and the model, so the server and every site derive the same modules.
    """
    targets = tuple(section.target_modules)
    if not targets:
        kind = model.config.model_type
        targets = default_targets(kind)
        if not targets:
            raise ConfigError(
                f"lora.target_modules is empty and privlora knows no default for model_type "
                f"{kind!r}; name them, e.g. lora.target_modules = ['q_proj', 'v_proj'] (its "
                f"Linear modules are {_linear_leaves(model)})")
        log.info("lora.target_modules: %s's default %s", kind, list(targets))
    return LoraSpec(section.rank, section.alpha, section.dropout, targets, section.last_layers)


@dataclass(frozen=True)
class Factors:
    """One adapted Linear's LoRA factors: the update is scale * B @ A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)


Adapter = dict[str, Factors]


@dataclass
class LoraHandles:
    """The PEFT-wrapped model and its LoRA layers, found by module type, in a stable order."""

    model: PeftModel
    layers: dict[str, LoraLayer] = field(default_factory=dict)


def attach(model: PreTrainedModel, spec: LoraSpec, seed: int) -> LoraHandles:
    """Wrap ``model`` with fresh LoRA factors (A seeded, B zero); only LoRA tensors train."""
    adapted = _adapted_modules(model, spec.target_modules)
    config = LoraConfig(
        layers_to_transform=_last_layers(model, spec.last_layers),
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        # Why: a Conv1D (GPT-2's c_attn) stores its weight as (in, out); told so, PEFT saves it
        # in the adapter config instead of changing the setting itself with a warning
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in adapted),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Why: PEFT draws A from the global RNG; seeding it makes the initial A a function of the seed,
    # which FFA-LoRA relies on (every party derives the same frozen A).
    with torch.random.fork_rng(), quiet.peft_wrapping():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    layers = {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    }
    for module in layers.values():  # LoRA factors train in float32 even when the base is bf16
        module.lora_A[ADAPTER_NAME].float()
        module.lora_B[ADAPTER_NAME].float()
    return LoraHandles(peft_model, layers)


def _last_layers(model: PreTrainedModel, k: int) -> list[int] | None:
    """Return the indices of the last ``k`` decoder layers (None: every layer)."""
    if k == 0:
        return None
    total = getattr(model.config, "num_hidden_layers", None)
    if total is None:
        raise ConfigError("lora.last_layers needs a model whose config has num_hidden_layers; "
                          "set lora.last_layers = 0")
    if k > total:
        raise ConfigError(f"lora.last_layers = {k} but the model has {total} decoder layers; "
                          f"use 1..{total}, or 0 for all")
    return list(range(total - k, total))


def _adapted_modules(model: PreTrainedModel, targets: tuple[str, ...]) -> list[torch.nn.Module]:
    """Return the Linear (or GPT-2 Conv1D) layers that ``targets`` name; refuse a name that
    matches none, naming those the model has.

    A name matches as PEFT matches list entries: the module's full path, or its end after a dot.
    """
    linears = _linears(model)
    unknown = [t for t in targets if not any(p == t or p.endswith("." + t) for p in linears)]
    if unknown:
        raise ConfigError(
            f"lora.target_modules has {unknown}, which this model does not have; its Linear "
            f"modules are {_linear_leaves(model)}; e.g. lora.target_modules = ['q_proj', "
            "'v_proj'], or [] for the model family's default"
        )
    return [m for p, m in linears.items() if any(p == t or p.endswith("." + t) for t in targets)]


def _linears(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """Return the Linear (and GPT-2 Conv1D) modules LoRA can adapt, by path."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear | Conv1D)}


def _linear_leaves(model: PreTrainedModel) -> list[str]:
    """Return the distinct last names of those modules, sorted."""
    return sorted({p.rsplit(".", 1)[-1] for p in _linears(model)})


def lora_linears(handles: LoraHandles) -> dict[str, tuple[torch.nn.Linear, torch.nn.Linear]]:
    """Return each layer's (lora_A, lora_B) ``nn.Linear`` modules."""
    return {
        name: (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME])
        for name, layer in handles.layers.items()
    }


def read_adapter(handles: LoraHandles) -> Adapter:
    """Copy the current LoRA factors out of the model (float32, detached, on the CPU)."""
    return {
        name: Factors(A=a.weight.detach().float().cpu().clone(),
                      B=b.weight.detach().float().cpu().clone())
        for name, (a, b) in lora_linears(handles).items()
    }


@torch.no_grad()
def write_adapter(handles: LoraHandles, adapter: Adapter) -> None:
    """Load ``adapter`` into the model in place (names and shapes must match)."""
    linears = lora_linears(handles)
    if set(adapter) != set(linears):
        missing = sorted(set(linears) - set(adapter))[:3]
        extra = sorted(set(adapter) - set(linears))[:3]
        raise ValueError(f"adapter layers do not match the model: missing {missing}, extra {extra}")
    for name, (a, b) in linears.items():
        a.weight.copy_(adapter[name].A)
        b.weight.copy_(adapter[name].B)


def set_trainable(handles: LoraHandles, train_a: bool) -> list[torch.nn.Parameter]:
    """Make B (and A unless ``train_a`` is False, as in FFA-LoRA) trainable; return those params."""
    params = []
    for a, b in lora_linears(handles).values():
        a.weight.requires_grad_(train_a)
        b.weight.requires_grad_(True)
        params += [a.weight, b.weight] if train_a else [b.weight]
    return params


def wire_name(layer: str, factor: str) -> str:
    """Return the wire name of one factor ("A" or "B") of ``layer``: ``"<layer>.lora_A"``."""
    return layer + _SUFFIX[factor]


def is_factor_b(name: str) -> bool:
    """Return whether a wire name is a B factor (the one FFA-LoRA trains and sends)."""
    return name.endswith(_SUFFIX["B"])


def trained_parameters(handles: LoraHandles, train_a: bool) -> dict[str, torch.nn.Parameter]:
    """Return the parameters a client trains by wire name, sorted: B, and A unless frozen."""
    named = {}
    for layer, (a, b) in lora_linears(handles).items():
        if train_a:
            named[wire_name(layer, "A")] = a.weight
        named[wire_name(layer, "B")] = b.weight
    return dict(sorted(named.items()))


def flatten(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Flatten to ``{"<module>.lora_A": A, "<module>.lora_B": B}`` in a stable order (wire format)."""
    flat: dict[str, torch.Tensor] = {}
    for name in sorted(adapter):
        flat[wire_name(name, "A")] = adapter[name].A
        flat[wire_name(name, "B")] = adapter[name].B
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> Adapter:
    """Invert ``flatten``: wire names back to factors by layer."""
    layers = sorted({name[: -len(_SUFFIX["A"])] for name in flat if name.endswith(_SUFFIX["A"])})
    return {layer: Factors(A=flat[wire_name(layer, "A")], B=flat[wire_name(layer, "B")])
            for layer in layers}


def released_coordinates(adapter: Adapter, train_a: bool) -> int:
    """Return how many numbers a client's update carries: A and B, or B alone when A is frozen."""
    return sum(f.B.numel() + (f.A.numel() if train_a else 0) for f in adapter.values())


def save_peft(handles: LoraHandles, adapter: Adapter, out_dir: Path) -> None:
    """Save ``adapter`` as adapter_config.json + adapter_model.safetensors that PeftModel loads."""
    write_adapter(handles, adapter)
    handles.model.save_pretrained(str(out_dir))


def first_components(flat: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Keep the first ``rank`` components of flat factors: rows of A, columns of B (wire format)."""
    return {
        name: (t[:, :rank] if is_factor_b(name) else t[:rank]).contiguous()
        for name, t in flat.items()
    }
