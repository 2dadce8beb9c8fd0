"""The Flower deployment runtime for real: a SuperLink and SuperNodes on 127.0.0.1 (separate
processes, gRPC, a fresh ClientApp process per message), the tiny model.

Each test starts its own federation (about a minute each on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privlora import simulation
from privlora.flower.local import DeploymentFailed, LocalFederation, descendants, run_local

pytestmark = pytest.mark.integration  # deselect with -m 'not integration'

FAULTY_APP = Path(__file__).parent / "flower_faulty_app"
CLIENT_DP = ("federation.num_clients=2", "privacy.mode=client", "privacy.noise_multiplier=0.8",
             "privacy.clip=0.5", "privacy.reproducible_noise=true")


def _checkpoints(run: Path) -> list[dict[str, torch.Tensor]]:
    folders = sorted((run / "checkpoints").iterdir())
    return [load_file(str(f / "adapter.safetensors")) for f in folders]


def _final_adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(("secure", "settings"), [
    (False, ("federation.num_clients=2", "train.threads=1", "train.lr_schedule=cosine")),
    (True, (*CLIENT_DP, "train.threads=1", "quantization.base=q8_0",
            "quantization.uplink_bits=8", "train.loss=label"))],
    ids=["insecure-no-dp-cosine", "tls-node-auth-client-dp-a-q8_0-bundle-and-the-label-loss"])
def test_deployment_matches_the_simulation(tmp_path, tiny_config, read_metrics, secure, settings):
    """2 sites, 2 rounds, the same config and seed: every round's global adapter and the final
    PEFT adapter equal the in-process simulation's bit for bit (train.threads pins each local
    update's CPU threads in both runtimes; the sites' SuperNodes get fewer cores than the
    simulation has). Without DP, with the cosine learning-rate schedule (each site places its
    steps by the round number the server sends); and in the secure federation with
    client-level DP and reproducible noise (the ledger equal too), composed with FedLPP: each
    site trains on the q8_0 bundle named in its node-config (checked against the server's
    digest) and rounds its uplink to 8 bits; and its sites train the label-only loss
    (train.loss = "label") exactly as simulated clients do."""
    config = tiny_config(*settings)
    held: list[LocalFederation] = []
    deployed = run_local(config, tmp_path / "flower", secure=secure, on_start=held.append)
    simulated = simulation.run(config, tmp_path / "simulation")

    # a SuperLink, 2 SuperNodes and each node's ClientApp worker, each its own process group
    started = held[0].processes.started
    assert len(started) == 5 and all(p.returncode is not None for p in started)
    assert sum("worker" in p.args for p in started) == 2
    for proc in started:  # nothing of theirs (SuperExec, ServerApp, ClientApps) survives
        assert _alive_in_group(proc.pid) == []

    flower, local = _checkpoints(tmp_path / "flower"), _checkpoints(tmp_path / "simulation")
    assert len(flower) == len(local) == 2
    flower.append(_final_adapter(tmp_path / "flower"))
    local.append(_final_adapter(tmp_path / "simulation"))
    for a, b in zip(flower, local):
        assert a.keys() == b.keys()
        for name in a:  # bit for bit, not merely within float32's tolerance
            assert torch.equal(a[name], b[name]), (name, float((a[name] - b[name]).abs().max()))
    assert any(float(t.abs().max()) > 1e-3 for t in flower[1].values())  # it moved
    private = deployed.summary["privacy"] is not None
    assert private == ("privacy.mode=client" in settings)
    if private:
        ledger = json.loads((tmp_path / "flower" / "ledger.json").read_text())
        assert ledger == json.loads((tmp_path / "simulation" / "ledger.json").read_text())
    assert deployed.summary["privacy"] == simulated["privacy"]
    assert deployed.summary["final"] == simulated["final"]
    rows = read_metrics(tmp_path / "flower")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for got, want in zip(rows, read_metrics(tmp_path / "simulation"), strict=True):
        assert got.keys() == want.keys()  # and bytes counted the same way
        for key, value in want.items():
            if key != "seconds":  # wall time: shown without DP, and never equal
                assert got[key] == value, key
    if "quantization.base=q8_0" in settings:
        assert deployed.summary["model_privacy"] == simulated["model_privacy"]
    # the simulation also holds its sites' own ledgers (sites/); a Flower site keeps its own
    assert set(os.listdir(tmp_path / "flower")) == set(os.listdir(tmp_path / "simulation")) - {
        "sites"}


def test_malformed_updates_are_refused_and_the_run_goes_on(tmp_path, tiny_config, read_metrics):
    """Two sites send, over the network, one malformed update each per round (wrong shape,
    NaN, inf, an extra tensor, a missing one, an over-clip norm); each is refused with its
    reason in the server's log, and the honest site's updates carry the run (local DP mode:
    the sites clip their releases, so the server checks the norm)."""
    faults = {1: "shape,extra,norm", 2: "nan,inf,missing"}

    def add_faults(sites):
        for cid, kinds in faults.items():
            sites[cid]["fault"] = kinds

    # sigma 0.5, not smaller: at 0.01 one PLD epsilon (of 3 releases) took 45 s of the round
    config = tiny_config("federation.num_clients=3", "federation.rounds=3", "privacy.mode=local",
                         "privacy.noise_multiplier=0.5", "privacy.clip=1.0")
    result = run_local(config, tmp_path / "run", app=FAULTY_APP, on_site=add_faults)

    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 4
    for row in rows[1:]:
        assert row["clients"] == [0, 1, 2]
        assert row["rejected"] == [1, 2]
    log = result.server_log
    for reason in ("wrong shape", "NaN or inf", "unexpected ['base_model.extra.lora_B']",
                   "missing [", "over the"):
        assert reason in log, reason
    assert log.count("update refused") == 6
    # the one accepted update per round moved the adapter
    last = _checkpoints(tmp_path / "run")[-1]
    assert any(float(t.abs().max()) > 0 for t in last.values())
    # every site was sent every round, so each is charged for each (local mode: per site)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert {p: len(e) for p, e in ledger["events"].items()} == {f"client-{c}": 3 for c in range(3)}


def test_a_site_killed_mid_run_is_left_out_and_the_ledger_says_what_happened(
        tmp_path, tiny_config, read_metrics):
    """Sample-level DP, 2 sites, min_clients 1: site 1's SuperNode is killed (SIGKILL) as
    round 1 starts. Each round completes with site 0, and site 1 is charged only for the
    rounds it was sent (the server cannot tell whether a site that was sent a round released
    its update, so it charges it: the ledger may overstate, never understate)."""
    holder: dict[str, LocalFederation] = {}

    def kill_site_1(row):
        if row["round"] == 0:
            for proc in holder["federation"].sites[1]:  # its SuperNode and ClientApp worker
                os.killpg(proc.pid, signal.SIGKILL)

    config = tiny_config("federation.num_clients=2", "federation.round_timeout=40",
                         "privacy.mode=sample", "privacy.noise_multiplier=1.0",
                         "privacy.sample_rate=0.2", "privacy.clip=1.0")
    result = run_local(config, tmp_path / "run", on_start=lambda f: holder.update(federation=f),
                       on_round=kill_site_1)

    rows = read_metrics(tmp_path / "run")[1:]
    assert len(rows) == 2 and all(r["accuracy"] is not None for r in rows)
    for row in rows:
        assert 0 in row["clients"] and 1 not in set(row["clients"]) - set(row["rejected"])
    assert "client 1 left out" in result.server_log
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    sent = {c: sum(c in r["clients"] for r in rows) for c in (0, 1)}
    assert {p: len(e) for p, e in ledger["events"].items()} == {
        f"client-{c}": sent[c] for c in (0, 1) if sent[c]}
    assert result.summary["final"]["accuracy"] is not None


def test_too_few_acceptable_updates_stop_the_run_with_a_clear_error(tmp_path, tiny_config):
    """min_clients 2 of 2, and one site's data file is malformed: the site fails, its error
    text stays at the site, and the run stops with an error naming federation.min_clients."""

    def break_site_1(sites):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "no label here"}\n')
        sites[1]["path"] = str(bad)

    config = tiny_config("federation.num_clients=2", "federation.min_clients=2")
    with pytest.raises(DeploymentFailed, match="min_clients = 2"):
        run_local(config, tmp_path / "run", on_site=break_site_1)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]  # nothing after the failed round


def _alive_in_group(group: int) -> list[int]:
    """The processes of process group ``group`` that still run (a zombie, dead but not yet
    reaped by whoever inherited it, does not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:  # it exited meanwhile
            continue
        if int(pgrp) == group and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _alive(pids: list[int]) -> set[int]:
    """The processes among ``pids`` that still run (zombies do not)."""
    alive = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _daemons(pid: int) -> list[int]:
    """The SuperLink and SuperNodes that process ``pid`` started (its children)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # it exited meanwhile
            continue
        if int(fields[1]) == pid and b"flower-super" in cmdline:  # not a passing `flwr ls`
            kids.append(int(stat.parent.name))
    return kids


def test_ctrl_c_stops_every_process_the_command_started(tmp_path):
    """`privlora flower local`, interrupted (SIGINT) once round 0 is logged: it exits, and the
    SuperLink and SuperNodes it started, and their process groups, are gone."""
    command = [sys.executable, "-m", "privlora", "flower", "local", "--clients", "2",
               "--model", "tiny-random", "--set", "model.dtype=float32",
               "--set", "data.builtin_examples=80", "--set", "data.max_eval=8",
               "--set", "federation.rounds=3", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    daemons: list[int] = []
    for line in proc.stderr:
        if line.startswith("round 0"):
            daemons = _daemons(proc.pid)
            family = descendants(proc.pid)  # the daemons, their SuperExecs, the ServerApp, ...
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=120)
    assert len(daemons) == 3  # the SuperLink and 2 SuperNodes
    for pid in daemons:
        assert _alive_in_group(pid) == []
    assert len(family) >= 7
    assert [pid for pid in family if pid in _alive(family)] == []
