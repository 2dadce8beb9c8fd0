"""End-to-end federated runs on the tiny random Llama: run dir, stock PEFT reload, determinism."""

import json

import pytest
import torch
from safetensors.torch import load_file

from privlora.config import load_config
from privlora.evaluate import majority_share
from privlora.evaluate_adapter import evaluate_adapter
from privlora.server import prepare, run

TINY = ["model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=120",
        "data.max_eval=16", "federation.rounds=2", "train.local_steps=2", "train.batch_size=4"]


def tiny_config(*extra):
    return load_config(None, TINY + list(extra))


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = run(tiny_config(), out)
    return out, summary


def test_run_directory_contract(fedavg_run):
    out, summary = fedavg_run
    for name in ["config.toml", "metrics.jsonl", "summary.json", "report.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/round_002/adapter.safetensors"]:
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ["accuracy", "loss", "clients", "bytes_up", "bytes_down", "seconds"]:
        assert key in rows[1]
    assert rows[1]["clients"] == [0, 1, 2, 3]
    assert rows[0]["accuracy"] == summary["zero_shot"]["accuracy"]
    assert json.loads((out / "summary.json").read_text())["final"] == summary["final"]
    eval_labels = [e.label for e in prepare(tiny_config()).eval_examples]
    assert summary["majority_class_accuracy"] == majority_share(eval_labels)


def test_majority_share_is_the_most_common_labels_fraction():
    assert majority_share(["a", "b", "a", "c"]) == 0.5
    assert majority_share(["a", None, "a"]) == 1.0  # unlabelled (generation) rows are skipped
    assert majority_share([None, None]) is None


def test_communication_is_measured_from_payloads(fedavg_run):
    out, summary = fedavg_run
    adapter = load_file(str(out / "checkpoints/round_002/adapter.safetensors"))
    from privlora.communication import payload_bytes

    per_client = payload_bytes(adapter)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["bytes_down"] == 4 * per_client  # 4 clients download the global adapter
    assert rows[2]["bytes_up"] == 4 * per_client  # and upload an update of the same shapes
    comm = summary["communication"]
    assert comm["full_finetune_bytes_per_transfer"] > 50 * per_client
    assert comm["ratio_up_vs_full"] == pytest.approx(comm["bytes_up_total"]
                                                     / comm["full_finetune_bytes_up_total"])


def test_saved_adapter_reloads_with_stock_peft_and_reproduces_metrics(fedavg_run):
    out, summary = fedavg_run
    result = evaluate_adapter(out / "adapter", None, None)
    assert result["accuracy"] == summary["final"]["accuracy"]
    assert result["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


def test_same_config_same_adapter(fedavg_run, tmp_path):
    out, _ = fedavg_run
    run(tiny_config(), tmp_path)
    first = load_file(str(out / "adapter/adapter_model.safetensors"))
    second = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k)  # it trained


def test_training_improves_on_real_signal(tmp_path):
    # A larger learning rate on the tiny model: eval loss must drop from zero-shot.
    summary = run(tiny_config("train.lr=0.01", "federation.rounds=3", "train.local_steps=4"),
                  tmp_path)
    assert summary["final"]["loss"] < summary["zero_shot"]["loss"]


def test_client_subsampling_is_seeded(tmp_path):
    summary = run(tiny_config("federation.clients_per_round=2"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 2 for r in rows[1:])
    assert summary["communication"]["client_participations"] == 4


def test_client_fraction_picks_that_share_of_clients(tmp_path):
    summary = run(tiny_config("federation.client_fraction=0.5", "federation.rounds=1"), tmp_path)
    assert summary["communication"]["client_participations"] == 2
