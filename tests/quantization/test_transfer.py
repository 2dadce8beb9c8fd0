"""quantization.transfer = "logits": the server serves its full-precision base's log-probabilities
plus the adapter's change on the clients' quantized base (proxy tuning)."""

from __future__ import annotations

import pytest
import torch

from privlora.data import collate
from privlora.errors import ConfigError
from privlora.lm import OffsetModel, answer_logits
from privlora.lora import Factors, read_adapter, write_adapter
from privlora.simulation import prepare, run

LOGITS = ("quantization.base=q4_0", "quantization.transfer=logits")


def _trained(adapter, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {k: Factors(A=f.A, B=torch.randn(f.B.shape, generator=g) * 0.5)
            for k, f in adapter.items()}


def _batch(sim):
    return collate(sim.server.eval_examples[:4], sim.tokenizer.pad_token_id)


def _logprobs(model, batch):
    return answer_logits(model, batch).log_softmax(dim=-1)


def test_the_offset_is_the_full_base_plus_what_the_adapter_changes_on_the_quantized_one(
        tiny_config):
    sim = prepare(tiny_config(*LOGITS))
    adapter, batch = _trained(read_adapter(sim.handles)), _batch(sim)
    write_adapter(sim.central, adapter)  # switched off inside the offset: must not count
    write_adapter(sim.handles, adapter)
    offset = _logprobs(OffsetModel(sim.central.model, sim.handles.model), batch)
    tuned = _logprobs(sim.handles.model, batch)
    with sim.handles.model.disable_adapter():
        untuned = _logprobs(sim.handles.model, batch)
    with sim.central.model.disable_adapter():
        full = _logprobs(sim.central.model, batch)
    assert torch.allclose(offset.log_softmax(dim=-1),
                          (full + tuned - untuned).log_softmax(dim=-1), atol=1e-5)
    assert not torch.allclose(tuned, untuned, atol=1e-3)  # the adapter does change something


def test_a_zero_adapter_serves_the_full_precision_base_exactly(tiny_config):
    sim = prepare(tiny_config(*LOGITS))
    batch = _batch(sim)
    write_adapter(sim.central, _trained(read_adapter(sim.central), seed=1))
    write_adapter(sim.handles, read_adapter(sim.handles))  # B = 0: no change on the client base
    offset = _logprobs(OffsetModel(sim.central.model, sim.handles.model), batch)
    with sim.central.model.disable_adapter():
        full = _logprobs(sim.central.model, batch)
    assert torch.allclose(offset.log_softmax(dim=-1), full, atol=1e-5)


def test_a_logits_run_reports_the_offset_and_the_adapter_on_the_server_base(tiny_config,
                                                                              tmp_path):
    summary = run(tiny_config(*LOGITS, "federation.rounds=1"), tmp_path / "run")
    report = summary["model_privacy"]
    assert report["transfer"] == "logits"
    assert report["central"]["accuracy"] == summary["final"]["accuracy"]
    assert set(report["adapter_on_server_base"]) == set(report["central"])


@pytest.mark.parametrize("key", ["transfer=logits", "base_noise=bin"])
def test_server_side_options_need_a_quantized_base(tiny_config, key):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        tiny_config(f"quantization.{key}")
