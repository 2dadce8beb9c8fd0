"""End-to-end simulations on the tiny random Llama: the run directory, bytes, privacy, rules,
a round that loses clients."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from privlora import data, rounds, simulation
from privlora.communication import payload_bytes
from privlora.errors import ConfigError, RoundFailed
from privlora.evaluate import majority_share
from privlora.evaluate_adapter import evaluate_adapter
from privlora.lora import flatten
from privlora.privacy.ledger import PrivacyLedger
from privlora.privacy.plan import SECURE, SEEDED
from privlora.protocol import Payload
from privlora.simulation import prepare, run

LOCAL = ("privacy.mode=local", "privacy.noise_multiplier=1.0")


def adapter_of(out):
    return load_file(str(out / "adapter/adapter_model.safetensors"))


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("run")
    return out, run(tiny_config(), out)


def test_run_directory_contract(fedavg_run, tiny_config, read_metrics):
    out, summary = fedavg_run
    for name in ["config.toml", "metrics.jsonl", "summary.json", "report.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/round_002/adapter.safetensors"]:
        assert (out / name).is_file(), name
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients"] == [0, 1, 2, 3] and rows[1]["seconds"] > 0
    assert rows[1]["noise_source"] is None and rows[1]["train_loss"] > 0
    assert rows[0]["accuracy"] == summary["zero_shot"]["accuracy"]
    assert json.loads((out / "summary.json").read_text())["final"] == summary["final"]
    eval_labels = [e.label for e in prepare(tiny_config()).server.eval_examples]
    assert summary["majority_class_accuracy"] == majority_share(eval_labels)
    assert summary["wall_seconds"] > 0


def test_majority_share_is_the_most_common_labels_fraction():
    assert majority_share(["a", "b", "a", "c"]) == 0.5
    assert majority_share(["a", None, "a"]) == 1.0  # unlabelled (generation) rows are skipped
    assert majority_share([None, None]) is None


def test_bytes_counted_are_the_payloads_sent(fedavg_run, read_metrics):
    out, summary = fedavg_run
    adapter_bytes = payload_bytes(load_file(str(out / "checkpoints/round_001/adapter.safetensors")))
    row = read_metrics(out)[2]
    # each client downloads the round-1 global adapter, exactly as serialized
    assert [t["down"] for t in row["bytes_by_client"].values()] == [adapter_bytes] * 4
    # and uploads an update of the same tensors plus its example count and loss in the header
    assert all(0 < t["up"] - t["down"] <= 128 for t in row["bytes_by_client"].values())
    assert row["bytes_up"] == sum(t["up"] for t in row["bytes_by_client"].values())
    comm = summary["communication"]
    assert comm["full_finetune_bytes_per_transfer"] > 50 * adapter_bytes
    assert comm["ratio_up_vs_full"] == pytest.approx(comm["bytes_up_total"]
                                                     / comm["full_finetune_bytes_up_total"])


def test_saved_adapter_reloads_with_stock_peft_and_reproduces_metrics(fedavg_run):
    out, summary = fedavg_run
    result = evaluate_adapter(out / "adapter", None, None)
    meta = json.loads((out / "adapter" / "task.json").read_text())
    described = data.task_meta(data.task_from_meta(meta))  # task.json is task_meta's format
    assert all(meta[key] == value for key, value in described.items())
    assert result["accuracy"] == summary["final"]["accuracy"]
    assert result["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


def test_a_broken_task_json_is_named_not_a_traceback(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "task.json").write_text('{"name": "t", "kind": "classi')
    with pytest.raises(ConfigError, match="task.json is not JSON"):
        evaluate_adapter(tmp_path, None, None)
    (tmp_path / "task.json").write_text("[" * 100_000)  # refused before json.loads recurses
    with pytest.raises(ConfigError, match="task.json is not JSON"):
        evaluate_adapter(tmp_path, None, None)


def test_same_config_same_adapter(fedavg_run, tiny_config, tmp_path):
    out, _ = fedavg_run
    run(tiny_config(), tmp_path)
    first, second = adapter_of(out), adapter_of(tmp_path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k)  # it trained


def test_training_improves_on_real_signal(tiny_config, tmp_path):
    summary = run(tiny_config("train.lr=0.01", "federation.rounds=3", "train.local_steps=4"),
                  tmp_path)
    assert summary["final"]["loss"] < summary["zero_shot"]["loss"]


def test_client_subsampling_is_seeded_and_fractions_work(tiny_config, tmp_path, read_metrics):
    summary = run(tiny_config("federation.clients_per_round=2"), tmp_path / "count")
    assert all(len(r["clients"]) == 2 for r in read_metrics(tmp_path / "count")[1:])
    assert summary["communication"]["client_participations"] == 4
    summary = run(tiny_config("federation.client_fraction=0.5", "federation.rounds=1"),
                  tmp_path / "fraction")
    assert summary["communication"]["client_participations"] == 2


@pytest.mark.parametrize("mode, extra", [("sample", "privacy.sample_rate=0.2"),
                                         ("client", "privacy.clip=1.0"),
                                         ("local", "privacy.clip=1.0")])
def test_each_mode_spends_at_most_its_target_from_secure_noise(mode, extra, tiny_config,
                                                               tmp_path, read_metrics):
    summary = run(tiny_config(f"privacy.mode={mode}", "privacy.target_epsilon=8", extra),
                  tmp_path)
    ledger_file = json.loads((tmp_path / "ledger.json").read_text())
    ledger = PrivacyLedger.from_dict(ledger_file)
    spent = ledger.epsilon(accountant="pld")
    p = summary["privacy"]
    assert 0 < spent <= 8.0 and p["epsilon_spent_pld"] == pytest.approx(spent)
    assert p["neighbouring"] == ledger_file["neighbouring"]
    assert p["epsilon_planned"] >= spent * (1 - 1e-9)
    assert p["noise_source"] == ledger_file["noise_source"] == SECURE
    rows = read_metrics(tmp_path)
    assert all(r["noise_source"] == SECURE for r in rows)
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(spent)
    assert (tmp_path / "checkpoints/round_002/ledger.json").is_file()
    assert ledger.parties() == (["global"] if mode == "client"
                                else [f"client-{i}" for i in range(4)])


def test_default_noise_differs_between_runs_and_reproducible_noise_repeats(tiny_config, tmp_path,
                                                                            read_metrics):
    def final(name, *extra):
        run(tiny_config(*LOCAL, "federation.rounds=1", *extra), tmp_path / name)
        return adapter_of(tmp_path / name)

    secure = [final(f"secure{i}") for i in range(2)]
    seeded = [final(f"seeded{i}", "privacy.reproducible_noise=true") for i in range(2)]
    assert not all(torch.equal(secure[0][k], secure[1][k]) for k in secure[0])
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in seeded[0])
    # every published file says the seeded epsilon does not hold against the seed's holder
    ledger = json.loads((tmp_path / "seeded0" / "ledger.json").read_text())
    summary = json.loads((tmp_path / "seeded0" / "summary.json").read_text())
    assert ledger["noise_source"] == summary["privacy"]["noise_source"] == SEEDED
    assert all(r["noise_source"] == SEEDED for r in read_metrics(tmp_path / "seeded0"))
    assert "does NOT hold" in SEEDED


@pytest.mark.parametrize("mode, extra", [("sample", "privacy.sample_rate=0.2"),
                                         ("local", "privacy.clip=1.0"),
                                         ("client", "privacy.clip=1.0")])
def test_private_modes_release_nothing_unnoised(mode, extra, tiny_config, tmp_path, read_metrics):
    config = tiny_config(f"privacy.mode={mode}", "privacy.noise_multiplier=1.0", extra,
                         "federation.rounds=1")
    summary = run(config, tmp_path)
    row = read_metrics(tmp_path)[1]
    assert row["train_loss"] is None  # client losses are data-dependent and not noised
    assert row["seconds"] is None and summary["wall_seconds"] is None  # grow with batch sizes
    if mode == "client":  # Poisson participation is what amplification hides
        hidden = ["clients", "bytes_up", "bytes_down", "bytes_up_per_client", "rejected",
                  "bytes_down_per_client", "bytes_by_client", "ratio_up_vs_full"]
        assert all(row[k] is None for k in hidden)
        comm = summary["communication"]
        assert comm["participations_are_expected_values"]
        expected = summary["privacy"]["sample_rate"] * 4 * 1  # q * num_clients * rounds
        assert comm["client_participations"] == pytest.approx(expected)
        per_client = payload_bytes(flatten(prepare(config).init))  # shapes only: all rank 8
        assert comm["bytes_up_total"] == pytest.approx(per_client * expected)
        assert comm["bytes_down_total"] == comm["bytes_up_total"]
    else:
        assert row["bytes_up"] > 0 and row["ratio_up_vs_full"] < 1


@pytest.mark.parametrize("mode", [None, "sample", "client", "local"])
def test_ffa_sends_b_only_and_a_stays_bit_identical_to_its_seeded_init(mode, tiny_config,
                                                                      tmp_path, read_metrics):
    extra = [] if mode is None else [f"privacy.mode={mode}", "privacy.noise_multiplier=1.0"]
    extra += ["privacy.sample_rate=0.2"] if mode == "sample" else []
    config = tiny_config("federation.aggregation=ffa", "train.lr=0.01", *extra)
    initial = flatten(prepare(config).init)
    run(config, tmp_path)
    for round_ in (1, 2):
        saved = load_file(str(tmp_path / f"checkpoints/round_{round_:03d}/adapter.safetensors"))
        a_keys = [k for k in saved if k.endswith("lora_A")]
        assert a_keys and all(torch.equal(saved[k], initial[k]) for k in a_keys)
        assert any(not torch.equal(saved[k], initial[k]) for k in saved if k.endswith("lora_B"))
    if mode != "client":
        # q_proj and v_proj have B of shapes (32, 4) and (16, 4) vs A (4, 32): B is under half
        b_only = read_metrics(tmp_path)[1]["bytes_down"]
        assert b_only < 0.5 * 4 * payload_bytes(initial)


def test_fedavg_logs_its_inexactness_and_exact_its_residual(tiny_config, tmp_path, read_metrics):
    run(tiny_config("train.lr=0.01"), tmp_path / "fedavg")
    rows = read_metrics(tmp_path / "fedavg")
    assert rows[2]["aggregation"] == "fedavg" and rows[2]["factor_gap_max"] > 0
    run(tiny_config("train.lr=0.01", "federation.aggregation=exact"), tmp_path / "exact")
    rows = read_metrics(tmp_path / "exact")
    assert all(0 <= r["svd_residual_max"] < 1 for r in rows[1:])
    a = next(v for k, v in adapter_of(tmp_path / "exact").items() if "lora_A" in k)
    assert a.shape[0] == 8  # lora.rank default


def test_heterogeneous_ranks_move_bytes_in_proportion(tiny_config, tmp_path, read_metrics):
    summary = run(tiny_config("train.lr=0.01", "federation.aggregation=exact",
                              "lora.client_ranks=[2, 8]"), tmp_path)
    assert summary["final"]["loss"] < summary["zero_shot"]["loss"]
    down = {cid: t["down"] for cid, t in read_metrics(tmp_path)[1]["bytes_by_client"].items()}
    assert down["0"] == down["2"] and down["1"] == down["3"]  # ranks cycle: 0 and 2 have rank 2
    assert down["0"] < 0.4 * down["1"]


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "exact"])
def test_client_mode_with_every_rule(rule, tiny_config, tmp_path):
    summary = run(tiny_config(f"federation.aggregation={rule}", "privacy.mode=client",
                              "privacy.noise_multiplier=1.0"), tmp_path)
    assert summary["privacy"]["epsilon_spent_pld"] > 0
    assert all(torch.isfinite(v).all() for v in adapter_of(tmp_path).values())


def test_exact_under_local_dp(tiny_config, tmp_path):
    summary = run(tiny_config("federation.aggregation=exact", *LOCAL), tmp_path)
    assert summary["privacy"]["epsilon_spent_pld"] > 0
    assert all(torch.isfinite(v).all() for v in adapter_of(tmp_path).values())


def test_the_three_line_python_api(tmp_path):
    import privlora

    config = privlora.load_config(None, ["model.name=tiny-random", "data.builtin_examples=80",
                                         "data.max_eval=8", "federation.rounds=1",
                                         "train.local_steps=1"])
    summary = privlora.run(config, str(tmp_path / "api"))
    assert summary["rounds"] == 1 and (tmp_path / "api" / "summary.json").is_file()
    assert summary["privacy"] is None


def test_eval_every_skips_rounds_but_always_scores_the_last(tiny_config, tmp_path, read_metrics):
    summary = run(tiny_config("federation.rounds=3", "federation.eval_every=2"), tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["loss"] is not None for r in rows] == [True, False, True, True]
    assert summary["final"]["loss"] == rows[3]["loss"]
    assert (tmp_path / "report.png").stat().st_size > 0


def test_model_device_cuda_without_a_gpu_is_a_config_error(tiny_config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from privlora.errors import ConfigError

    with pytest.raises(ConfigError, match="model.device = 'cuda'"):
        run(tiny_config("model.device=cuda"), tmp_path)
    assert not tmp_path.joinpath("metrics.jsonl").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["none", "sample"])
def test_the_same_run_on_cuda_matches_the_cpu(mode, tiny_config, tmp_path):
    extra = [] if mode == "none" else ["privacy.mode=sample", "privacy.noise_multiplier=1",
                                       "privacy.sample_rate=0.5", "privacy.reproducible_noise=true"]
    cpu = run(tiny_config("model.device=cpu", "train.lr=0.01", *extra), tmp_path / "cpu")
    gpu = run(tiny_config("model.device=cuda", "train.lr=0.01", *extra), tmp_path / "gpu")
    assert gpu["final"]["loss"] == pytest.approx(cpu["final"]["loss"], rel=1e-3)
    a, b = adapter_of(tmp_path / "cpu"), adapter_of(tmp_path / "gpu")
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


class LossyTransport:
    """The in-process wire, except that client 1 never answers and client 2 sends NaN."""

    def __init__(self, sim):
        self.inner = simulation.InProcess(sim)

    def reachable(self, ids):
        return ids

    def exchange(self, round_, downs, run):
        replies = self.inner.exchange(round_, downs, run)
        replies.pop(1, None)
        payload, size = replies[2]
        bad = dict(payload.tensors)
        name = min(bad)
        bad[name] = torch.full_like(bad[name], math.nan)
        replies[2] = (Payload(bad, payload.meta), size)
        return replies


def test_a_round_goes_on_without_the_clients_it_lost(tiny_config, tmp_path, read_metrics, caplog):
    config = tiny_config("federation.num_clients=4", "privacy.mode=local",
                         "privacy.noise_multiplier=0.5")
    sim = simulation.prepare(config)
    with caplog.at_level("WARNING", logger="privlora.local"):
        rounds.run_rounds(sim, LossyTransport(sim), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")[1:]
    assert all(r["clients"] == [0, 1, 2, 3] and r["rejected"] == [1, 2] for r in rows)
    assert all(r["bytes_by_client"]["1"]["up"] == 0 for r in rows)
    assert "client 1 left out: no reply" in caplog.text
    assert "client 2 sent NaN or inf" in caplog.text
    # what is published says nothing of why: the reasons stay in the server's log
    published = "".join(p.read_text() for p in (tmp_path / "run").glob("*.json*"))
    assert "NaN" not in published and "no reply" not in published


def test_too_few_acceptable_updates_stop_the_run_after_the_rounds_before(tiny_config, tmp_path,
                                                                          read_metrics):
    config = tiny_config("federation.num_clients=4", "federation.min_clients=3")
    sim = simulation.prepare(config)
    with pytest.raises(RoundFailed, match=r"round 1: 2 of 4 clients .*min_clients = 3"):
        rounds.run_rounds(sim, LossyTransport(sim), tmp_path / "run")
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [0]
