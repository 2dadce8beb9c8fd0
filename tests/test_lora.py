"""LoRA through PEFT: attach (and refuse unknown modules), wire names, read/write, rank shares."""

from __future__ import annotations

import pytest
import torch

from privlora.errors import ConfigError
from privlora.lora import (
    LoraSpec,
    attach,
    first_components,
    flatten,
    is_factor_b,
    read_adapter,
    trained_parameters,
    wire_name,
    write_adapter,
)
from tests.builders import random_adapter_like


def test_attach_adapts_the_named_modules_with_a_seeded_a_and_zero_b(tiny_model):
    handles = attach(tiny_model, LoraSpec(rank=4, alpha=8, target_modules=("q_proj",)), seed=3)
    adapter = read_adapter(handles)
    assert sorted(adapter) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert all(torch.count_nonzero(f.B) == 0 and torch.count_nonzero(f.A) > 0
               for f in adapter.values())
    assert all(f.A.dtype == torch.float32 for f in adapter.values())


def test_an_unknown_target_module_names_the_modules_the_model_has(tiny_model):
    with pytest.raises(ConfigError, match=r"\['q_prj'\].*'k_proj'.*'q_proj'.*'v_proj'"):
        attach(tiny_model, LoraSpec(target_modules=("q_prj", "v_proj")), seed=0)


def test_targets_match_like_peft_by_leaf_or_dotted_suffix(tiny_model):
    handles = attach(tiny_model, LoraSpec(rank=2, alpha=4, target_modules=("self_attn.o_proj",)),
                     seed=0)
    assert sorted(read_adapter(handles)) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]


def test_wire_names_and_flatten_order(tiny_lora):
    flat = flatten(read_adapter(tiny_lora))
    assert list(flat) == sorted(flat)
    layer = next(iter(read_adapter(tiny_lora)))
    assert wire_name(layer, "A") in flat and wire_name(layer, "B") in flat
    assert is_factor_b(wire_name(layer, "B")) and not is_factor_b(wire_name(layer, "A"))


def test_write_then_read_returns_the_same_factors_as_copies(tiny_lora):
    new = random_adapter_like(read_adapter(tiny_lora), 0)
    write_adapter(tiny_lora, new)
    back = read_adapter(tiny_lora)
    assert all(torch.equal(back[n].A, new[n].A) and torch.equal(back[n].B, new[n].B) for n in new)
    back[next(iter(back))].A.add_(1.0)  # a copy: the model is not changed through it
    assert all(torch.equal(read_adapter(tiny_lora)[n].A, new[n].A) for n in new)
    with pytest.raises(ValueError, match="missing"):
        write_adapter(tiny_lora, dict(list(new.items())[:1]))


def test_trained_parameters_leave_out_a_when_it_is_frozen(tiny_lora):
    with_a, b_only = trained_parameters(tiny_lora, True), trained_parameters(tiny_lora, False)
    assert set(b_only) == {k for k in with_a if is_factor_b(k)}
    assert len(with_a) == 2 * len(b_only) == 8


def test_first_components_keep_rows_of_a_and_columns_of_b():
    flat = {"l.lora_A": torch.arange(12.0).view(4, 3), "l.lora_B": torch.arange(8.0).view(2, 4)}
    share = first_components(flat, 2)
    assert torch.equal(share["l.lora_A"], flat["l.lora_A"][:2])
    assert torch.equal(share["l.lora_B"], flat["l.lora_B"][:, :2])
