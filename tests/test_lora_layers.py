"""lora.last_layers: only the top k decoder layers get LoRA factors; bad k is a config error."""

import pytest

from privlora.errors import ConfigError
from privlora.lora import LoraSpec, attach


def test_last_layers_adapts_only_the_top_layers(tiny_model):
    total = tiny_model.config.num_hidden_layers
    handles = attach(tiny_model, LoraSpec(rank=2, alpha=4, last_layers=1), seed=0)
    indices = {int(name.split("layers.")[1].split(".")[0]) for name in handles.layers}
    assert indices == {total - 1}
    assert len(handles.layers) == 2  # q_proj and v_proj of that layer


def test_last_layers_beyond_the_model_is_refused(tiny_model):
    total = tiny_model.config.num_hidden_layers
    with pytest.raises(ConfigError, match=f"has {total} decoder layers"):
        attach(tiny_model, LoraSpec(last_layers=total + 1), seed=0)
