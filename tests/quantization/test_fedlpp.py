"""FedLPP in the simulation: clients train on the quantized bundle, the server keeps full
precision, and the run reports central against client-visible scores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from privlora.errors import ConfigError
from privlora.lora import flatten
from privlora.models import load_model
from privlora.quantization.bundle import model_weights
from privlora.quantization.schemes import decode, encode, tensor_type
from privlora.simulation import prepare, run

FEDLPP = ("quantization.base=q4_0",)


@pytest.fixture(scope="module")
def general_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("general") / "general.jsonl"
    rows = [{"answer": f"The river {i} runs to the sea past the old mill and the town."}
            for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def fedlpp_run(tmp_path_factory, tiny_config, general_text):
    out = tmp_path_factory.mktemp("fedlpp")
    config = tiny_config(*FEDLPP, f"quantization.general_text={json.dumps(str(general_text))}")
    return out, run(config, out)


def _base_weights(handles) -> dict[str, torch.Tensor]:
    """The frozen base weights under the PEFT wrapper, by their plain model names."""
    base = handles.model.get_base_model()
    return {name.replace(".base_layer", ""): p.detach().clone()
            for name, p in base.named_parameters() if "lora_" not in name}


def test_clients_hold_the_quantized_base_and_the_server_full_precision(tiny_config):
    sim = prepare(tiny_config(*FEDLPP))
    full = model_weights(load_model("tiny-random", "float32", "cpu"))
    central, client = _base_weights(sim.central), _base_weights(sim.handles)
    for name, x in full.items():
        assert torch.equal(central[name], x), name
        qtype = tensor_type("q4_0", tuple(x.shape))
        expected = decode(encode(x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x, qtype), qtype)
        assert torch.equal(client[name], expected.reshape(x.shape)), name
    assert any(not torch.equal(central[n], client[n]) for n in full)
    assert sim.handles.model is not sim.central.model
    assert sim.server.bundle is not None and sim.server.bundle.scheme == "q4_0"


def test_without_quantization_clients_and_server_share_one_model(tiny_config):
    sim = prepare(tiny_config())
    assert sim.handles is sim.central and sim.server.bundle is None


def test_the_run_reports_central_against_client_visible(fedlpp_run, read_metrics):
    out, summary = fedlpp_run
    report = summary["model_privacy"]
    rows = read_metrics(out)
    assert [("model_privacy" in r) for r in rows] == [True, True, True]
    first, last = rows[0]["model_privacy"], rows[-1]["model_privacy"]
    assert report["client_base"] == first["client_visible"]
    assert report["server_base"] == first["central"]
    assert report["central"] == last["central"] and report["client_visible"] == last["client_visible"]
    assert last["central"]["accuracy"] == rows[-1]["accuracy"]  # the headline is the central model
    assert first["central"]["loss"] == pytest.approx(summary["zero_shot"]["loss"])
    # the quantized base is a different model: its scores differ from the full-precision ones
    assert first["client_visible"]["loss"] != first["central"]["loss"]
    assert first["client_visible"]["general_perplexity"] != first["central"]["general_perplexity"]
    ratio = last["client_visible"]["general_perplexity"] / last["central"]["general_perplexity"]
    assert report["general_perplexity_ratio"] == pytest.approx(ratio)
    assert report["bundle_weights_bytes"] < 0.2 * report["full_precision_bytes"]  # 4.5 of 32 bits
    assert report["bundle_bytes"] > report["bundle_weights_bytes"]  # + config and tokenizer
    assert summary["communication"]["bundle_bytes_down_total"] == 4 * report["bundle_bytes"]
    assert report["quantized_tensors_identical"] == 0  # random weights are on no grid


def test_the_saved_adapter_names_the_servers_base(fedlpp_run, tiny_config):
    out, _ = fedlpp_run
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    sim = prepare(tiny_config(*FEDLPP))
    client_base = sim.handles.model.get_base_model().config.name_or_path
    assert "bundle" in client_base  # the clients' model was loaded from the bundle directory
    assert saved["base_model_name_or_path"] == (
        sim.central.model.get_base_model().config.name_or_path or None)


@pytest.mark.parametrize("rule,mode", [("fedavg", "none"), ("ffa", "sample"),
                                       ("exact", "client"), ("fedavg", "local")])
def test_every_rule_and_mode_runs_on_the_quantized_wire(rule, mode, tiny_config, tmp_path):
    privacy = [] if mode == "none" else [f"privacy.mode={mode}", "privacy.noise_multiplier=1.0"]
    if mode == "sample":
        privacy.append("privacy.sample_rate=0.2")
    config = tiny_config(*FEDLPP, "quantization.adapter=q8_0", "quantization.uplink_bits=8",
                         f"federation.aggregation={rule}", *privacy)
    summary = run(config, tmp_path / "run")
    assert summary["model_privacy"]["adapter_scheme"] == "q8_0"
    assert (summary["privacy"] is None) == (mode == "none")
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_uplink_compression_changes_the_update_only_by_rounding(tiny_config, tmp_path):
    """8-bit stochastic rounding moves the global adapter by far less than the update itself."""
    plain = run(tiny_config(), tmp_path / "plain")
    packed = run(tiny_config("quantization.uplink_bits=8"), tmp_path / "packed")
    a, b = (load_file(str(tmp_path / d / "checkpoints/round_002/adapter.safetensors"))
            for d in ("plain", "packed"))
    start = flatten(prepare(tiny_config()).init)
    for name, value in a.items():
        update = value - start[name]
        assert (value - b[name]).norm() <= 0.05 * update.norm(), name
    assert any(not torch.equal(value, b[name]) for name, value in a.items())
    # 9 of 32 bits per value; on these tiny tensors the per-tensor headers add the rest
    assert packed["communication"]["bytes_up_total"] < 0.5 * plain["communication"]["bytes_up_total"]


def test_bad_quantization_settings_are_config_errors(tiny_config):
    with pytest.raises(ConfigError, match="uplink_bits"):
        tiny_config("quantization.uplink_bits=3")
    with pytest.raises(ConfigError, match="general_text"):
        tiny_config('quantization.general_text="x.jsonl"')
    with pytest.raises(ConfigError, match="quantization.base"):
        tiny_config("quantization.base=q3_k")


def test_the_plans_wire_costs_are_what_a_run_sends(tiny_config, tmp_path, read_metrics):
    from privlora.config import to_toml
    from privlora.privacy.report import plan_report

    config = tiny_config(*FEDLPP, "quantization.adapter=q8_0", "quantization.uplink_bits=4")
    (tmp_path / "run.toml").write_text(to_toml(config))
    wire = plan_report(tmp_path / "run.toml", [])["wire"]
    summary = run(config, tmp_path / "run")
    row = read_metrics(tmp_path / "run")[1]
    assert wire["uplink_bytes"] < wire["uplink_float32_bytes"]
    # a non-private uplink adds its two counts in the header; everything else is as planned
    assert 0 < row["bytes_up_per_client"] - wire["uplink_bytes"] < 100
    assert row["bytes_down_per_client"] == wire["downlink_bytes"]
    actual = summary["model_privacy"]["bundle_weights_bytes"]
    assert wire["bundle_weights_bytes"] <= actual <= wire["bundle_weights_bytes"] + 8192
    assert wire["full_precision_bytes"] == summary["model_privacy"]["full_precision_bytes"]


def test_client_mode_publishes_the_encoded_sizes_times_expected_participations(tiny_config,
                                                                               tmp_path):
    """Participation is hidden in client mode: the totals are the planned encoded sizes times
    q N rounds, which must be what each encoded payload really weighs."""
    from privlora.config import to_toml
    from privlora.privacy.report import plan_report

    config = tiny_config(*FEDLPP, "quantization.adapter=q4_0", "quantization.uplink_bits=4",
                         "privacy.mode=client", "privacy.noise_multiplier=1.0",
                         "federation.clients_per_round=2")
    (tmp_path / "run.toml").write_text(to_toml(config))
    wire = plan_report(tmp_path / "run.toml", [])["wire"]
    comm = run(config, tmp_path / "run")["communication"]
    assert comm["participations_are_expected_values"]
    assert comm["bytes_up_total"] == wire["uplink_bytes"] * comm["client_participations"]
    assert comm["bytes_down_total"] == wire["downlink_bytes"] * comm["client_participations"]


def test_nf4_base_runs_end_to_end(tiny_config, tmp_path):
    report = run(tiny_config("quantization.base=nf4"), tmp_path / "run")["model_privacy"]
    assert report["tensor_types"]["NF4"] == 2  # the tiny model's 64-wide down_proj rows
    assert report["client_base"]["loss"] != report["server_base"]["loss"]
