"""Which model families privlora fine-tunes, and the LoRA targets each gets by default.

privlora adapts decoder-only causal LMs. When ``lora.target_modules`` is empty, the targets come
from the model's ``model_type``: the attention's query and value projections (Hu et al., 2021,
"LoRA", Sec. 7.1: W_q and W_v together), or the one fused query-key-value projection where the
family has no separate ones. Families not listed take PEFT's own default for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from privlora.errors import ConfigError

_QUERY_VALUE = ("q_proj", "v_proj")

# model_type -> default targets; each is checked against the family's module names in
# tests/test_model_families.py
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
         "gemma2", "gemma3_text", "phi", "phimoe", "opt", "gptj", "gpt_neo", "stablelm", "olmo",
         "olmo2", "olmo3", "granite", "granitemoe", "cohere", "starcoder2", "smollm3", "helium",
         "glm", "glm4", "exaone4", "ernie4_5", "llama4_text", "gpt_oss"),
        _QUERY_VALUE),
    # one fused projection computes query, key and value
    "phi3": ("qkv_proj",),
    "codegen": ("qkv_proj",),
    "gpt2": ("c_attn",),  # a Conv1D
    "gpt_bigcode": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
    "mpt": ("Wqkv",),
}


def default_targets(model_type: str) -> tuple[str, ...]:
    """Return the LoRA target modules for ``model_type`` (empty: no default is known)."""
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    from privlora import import_peft_without_bitsandbytes

    import_peft_without_bitsandbytes()  # here, so that loading a model does not import PEFT
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    return tuple(PEFT.get(model_type, ()))


def finish_logits(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    """Apply to the LM head's output what the family's own forward does after its head.

    Elementwise, so it may run on any rows or columns of the logits (answer positions only,
    the label words only). ``lm.check_answer_path`` refuses a family this function misses.
    """
    match config.model_type:
        case "gemma2" | "gemma3_text" | "vaultgemma":  # Gemma 2, Sec. 2: logit soft-capping
            cap = config.final_logit_softcapping
            return logits if cap is None else torch.tanh(logits / cap) * cap
        case "cohere" | "cohere2":
            return logits * config.logit_scale
        case "granite" | "granitemoe" | "granitemoeshared":
            return logits / config.logits_scaling
        case _:
            return logits


def check_causal_lm(config: PretrainedConfig, name: str) -> None:
    """Refuse a model that is not a decoder-only causal LM, naming its ``model_type``."""
    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        what = "an encoder-decoder"
    elif kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = "a model with no causal-LM head in transformers"
    # Why: BERT-like encoders also have a causal-LM class, which attends causally only when the
    # config says is_decoder; as saved, such a checkpoint is a masked LM
    elif kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        what = "an encoder (masked LM)"
    else:
        return
    raise ConfigError(f"model.name = {name!r} is a {kind!r} model, {what}; privlora fine-tunes "
                      "decoder-only causal LMs (e.g. llama, qwen2, mistral, gemma, phi3, gpt2)")


@dataclass(frozen=True)
class ModelFacts:
    """What ``privacy.recipe = "auto"`` knows of a model: its size and the shapes of its Linear
    modules, read from the model's config alone (a meta-device build, no weights)."""

    parameters: int
    layers: int  # decoder layers (num_hidden_layers)
    # leaf module name ('v_proj', 'c_attn', ...) -> (in features, out features, how many)
    modules: dict[str, tuple[int, int, int]]
    default_targets: tuple[str, ...]  # the family's LoRA targets (``default_targets``)

    def coordinates(self, targets: Sequence[str], rank: int, last_layers: int,
                    trains_a: bool) -> int:
        """Return the numbers one client's update releases: rank x (out [+ in]) per adapted
        module (B only when A is frozen, as under FFA), over the adapted layers."""
        total = 0
        for name in targets or self.default_targets:
            if name not in self.modules:
                raise ConfigError(f"lora.target_modules names {name!r}, which this model lacks; "
                                  f"its Linear modules are {sorted(self.modules)}")
            fan_in, fan_out, count = self.modules[name]
            per_layer = max(1, count // self.layers)
            adapted = count if not last_layers else per_layer * min(last_layers, self.layers)
            total += adapted * rank * (fan_out + (fan_in if trains_a else 0))
        return total


def model_facts(name: str) -> ModelFacts:
    """Return the ``ModelFacts`` of ``model.name`` from its config, without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from privlora import models

    if name == models.TINY_RANDOM:
        vocab = len(models.load_tokenizer(name))
        with torch.device("meta"):
            model = models.tiny_random_llama(vocab)
    else:
        hf_config = AutoConfig.from_pretrained(models.local_source(name))
        check_causal_lm(hf_config, name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    return facts_of(model)


def facts_of(model: torch.nn.Module) -> ModelFacts:
    """Return the ``ModelFacts`` of a built model (its tensors may live on the meta device)."""
    from transformers.pytorch_utils import Conv1D

    modules: dict[str, tuple[int, int, int]] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shape = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2's: weight (in, out)
            shape = (module.weight.shape[0], module.weight.shape[1])
        else:
            continue
        leaf = path.rsplit(".", 1)[-1]
        fan_in, fan_out, count = modules.get(leaf, (*shape, 0))
        modules[leaf] = (fan_in, fan_out, count + 1)
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    return ModelFacts(parameter_count(model), int(layers), modules,
                      default_targets(config.model_type))


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the weight a parameter holds: an NF4 weight (``model.dtype = "nf4"``) is
    stored as packed 4-bit codes, half as many elements, with its own shape in its quant_state."""
    return getattr(getattr(param, "quant_state", None), "shape", None) or param.shape


def parameter_count(model: torch.nn.Module) -> int:
    """Count the model's parameters, an NF4 weight by its full shape (``full_shape``)."""
    return sum(math.prod(full_shape(param)) for param in model.parameters())
