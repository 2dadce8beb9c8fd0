"""Aggregation rules inside real federated runs: exact, heterogeneous ranks, diagnostics, bytes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from privlora.config import load_config
from privlora.errors import ConfigError
from privlora.server import run

TINY = ["model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=120",
        "data.max_eval=16", "federation.rounds=2", "train.local_steps=2", "train.batch_size=4",
        "train.lr=0.01"]


def tiny_config(*extra):
    return load_config(None, TINY + list(extra))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedavg_logs_its_inexactness(tmp_path):
    run(tiny_config(), tmp_path)
    rows = metrics(tmp_path)
    assert rows[2]["aggregation"] == "fedavg"
    # from round 2 on both factors are non-zero, so mean(B) mean(A) != mean(B A)
    assert rows[2]["factor_gap_max"] > 0


def test_exact_reports_truncation_residual_and_keeps_rank(tmp_path):
    run(tiny_config("federation.aggregation=exact"), tmp_path)
    rows = metrics(tmp_path)
    assert all("svd_residual_max" in r for r in rows[1:])
    # 4 clients of rank 4 sum to rank <= 16 products; truncating to rank 4 loses something
    assert 0 <= rows[2]["svd_residual_max"] < 1
    adapter = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    a = next(v for k, v in adapter.items() if "lora_A" in k)
    assert a.shape[0] == 8  # lora.rank default


def test_heterogeneous_ranks_with_exact(tmp_path):
    summary = run(tiny_config("federation.aggregation=exact", "lora.client_ranks=[2, 8]"),
                  tmp_path)
    assert summary["final"]["loss"] < summary["zero_shot"]["loss"]


def test_heterogeneous_ranks_bytes_follow_rank(tmp_path):
    run(tiny_config("federation.aggregation=exact", "lora.client_ranks=[2]"), tmp_path / "r2")
    run(tiny_config("federation.aggregation=exact"), tmp_path / "r8")
    small, full = metrics(tmp_path / "r2")[1], metrics(tmp_path / "r8")[1]
    assert small["bytes_up"] < 0.4 * full["bytes_up"]


def test_fedavg_refuses_heterogeneous_ranks():
    with pytest.raises(ConfigError, match="exact"):
        tiny_config("lora.client_ranks=[2, 8]")


def test_exact_under_local_dp(tmp_path):
    summary = run(tiny_config("federation.aggregation=exact", "privacy.mode=local",
                              "privacy.noise_multiplier=2.0"), tmp_path)
    assert summary["privacy"]["epsilon_spent_pld"] > 0
    adapter = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in adapter.values())
