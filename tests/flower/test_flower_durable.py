"""Durable, site-governed deployment runs on a real local Flower federation (tiny model):
the whole federation killed mid-run and the ServerApp restarted on the run directory; a site
whose own policy refuses the run, and the server going on without it."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from privlora import simulation
from privlora.flower.local import LocalFederation, descendants, run_local
from privlora.run_dir import last_checkpoint

pytestmark = pytest.mark.integration  # deselect with -m 'not integration'


class Crash(Exception):
    """The machine went down: every process of the federation got SIGKILL."""


def test_a_killed_federation_resumes_to_the_simulations_adapter(tmp_path, tiny_config):
    """Client-level DP with reproducible noise, 2 sites, 2 rounds. Once round 1 is logged,
    every daemon and app process is SIGKILLed; a new federation's ServerApp started with
    resume = true goes on from the run directory, and the run ends with the simulation's
    adapter and ledger."""
    config = tiny_config("federation.num_clients=2", "federation.rounds=2",
                         "privacy.mode=client", "privacy.noise_multiplier=0.8",
                         "privacy.clip=0.5", "privacy.reproducible_noise=true",
                         "train.threads=1")
    held: list[LocalFederation] = []

    def crash_after_round_1(row):
        if row["round"] == 1:
            deadline = time.time() + 60  # its checkpoint lands just after the row
            while last_checkpoint(out) is None and time.time() < deadline:
                time.sleep(0.05)
            for proc in held[0].processes.started:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            raise Crash

    out = tmp_path / "flower"
    with pytest.raises(Crash):
        run_local(config, out, on_start=held.append, on_round=crash_after_round_1)
    assert not (out / "summary.json").exists()
    assert last_checkpoint(out).round == 1
    deployed = run_local(config, out, resume=True)
    simulated = simulation.run(config, tmp_path / "simulation")
    a = load_file(str(out / "checkpoints" / "round_002" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "simulation" / "checkpoints" / "round_002" /
                      "adapter.safetensors"))
    for name in b:  # train.threads pinned: bit for bit
        assert torch.equal(a[name], b[name]), name
    assert json.loads((out / "ledger.json").read_text()) == json.loads(
        (tmp_path / "simulation" / "ledger.json").read_text())
    assert deployed.summary["privacy"] == simulated["privacy"]
    assert "resuming after round 1 of 2" in deployed.server_log


def test_a_site_that_refuses_the_mode_is_left_out_and_its_ledger_stays_empty(
        tmp_path, tiny_config, read_metrics):
    """Local DP, 2 sites: site 1's owner accepts only sample mode, so it refuses every round
    with a reason the server logs; the run goes on with site 0, whose own ledger holds exactly
    the events the server charged it."""
    ledgers = tmp_path / "ledgers"

    def site_1_accepts_only_sample_mode(sites):
        for cid, site in enumerate(sites):
            site.update({"max-epsilon": 20.0, "delta": 1e-5, "allow-non-private": False,
                         "ledger": str(ledgers / f"site{cid}.json")})
        sites[1]["modes"] = "sample"

    config = tiny_config("federation.num_clients=2", "federation.rounds=1",
                         "privacy.mode=local", "privacy.noise_multiplier=2.0",
                         "privacy.clip=0.5")
    result = run_local(config, tmp_path / "run", on_site=site_1_accepts_only_sample_mode)
    rows = read_metrics(tmp_path / "run")[1:]
    assert [r["rejected"] for r in rows] == [[1]]
    assert result.server_log.count("site refused: privacy.mode = 'local' is not among the "
                                   "modes this site accepts (sample") == 1
    assert not (ledgers / "site1.json").exists()
    site0 = json.loads((ledgers / "site0.json").read_text())
    [entries] = site0["datasets"].values()
    server_ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert [e["event"] for e in entries] == server_ledger["events"]["client-0"]
    # the server charged site 1 too (it charges before any release): an upper bound
    assert len(server_ledger["events"]["client-1"]) == 1
