"""Resume after a crash: ``privlora run --resume`` continues from the last complete round.

With reproducible noise a resumed run ends with the adapter and the ledger of an uninterrupted
run, bit for bit; with OS-random noise the round that was cut off stays charged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from privlora import client, simulation
from privlora.errors import ConfigError, PrivacyBudgetExceeded
from privlora.run_dir import last_checkpoint

LOCAL_DP = ("privacy.mode=local", "privacy.noise_multiplier=1.0", "privacy.clip=0.5",
            "federation.rounds=3")


def _crash_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th client round raise, as if the process died there."""
    real, calls = client.run_round, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt  # not an Exception: nothing in the loop may catch it
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "run_round", dies)


def _adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def _events(run: Path) -> dict[str, int]:
    ledger = json.loads((run / "ledger.json").read_text())
    return {party: len(events) for party, events in ledger["events"].items()}


def test_a_resumed_run_with_reproducible_noise_equals_an_uninterrupted_one(
        tiny_config, tmp_path, monkeypatch, read_metrics):
    # the cosine schedule reads each round's number: the resumed rounds take the same rates
    config = tiny_config(*LOCAL_DP, "privacy.reproducible_noise=true", "train.lr_schedule=cosine")
    whole = simulation.run(config, tmp_path / "whole")
    _crash_at(monkeypatch, 4 + 3)  # round 2, third client: round 2 is charged, half released
    with pytest.raises(KeyboardInterrupt):
        simulation.run(config, tmp_path / "cut")
    assert last_checkpoint(tmp_path / "cut").round == 1
    assert _events(tmp_path / "cut") == {f"client-{i}": 2 for i in range(4)}
    monkeypatch.undo()
    resumed = simulation.resume(tmp_path / "cut")
    assert _adapter_bytes(tmp_path / "cut") == _adapter_bytes(tmp_path / "whole")
    for name in ("ledger.json",):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert resumed["privacy"] == whole["privacy"] and resumed["final"] == whole["final"]
    assert read_metrics(tmp_path / "cut") == read_metrics(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [
        "round_001", "round_002", "round_003"]


def test_with_os_random_noise_the_cut_round_stays_charged(tiny_config, tmp_path, monkeypatch):
    config = tiny_config(*LOCAL_DP)
    _crash_at(monkeypatch, 4 + 1)
    with pytest.raises(KeyboardInterrupt):
        simulation.run(config, tmp_path)
    monkeypatch.undo()
    simulation.resume(tmp_path)
    # 3 rounds trained; round 2 charged when cut off and again when repeated
    assert _events(tmp_path) == {f"client-{i}": 4 for i in range(4)}
    summary = json.loads((tmp_path / "summary.json").read_text())
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert summary["privacy"]["epsilon_spent_pld"] == pytest.approx(ledger["epsilon"]["pld"]["max"])
    assert summary["privacy"]["epsilon_spent_pld"] > summary["privacy"]["epsilon_planned"]


def test_a_resume_that_would_overspend_is_refused_before_any_release(tiny_config, tmp_path,
                                                                     monkeypatch):
    config = tiny_config("privacy.mode=local", "privacy.target_epsilon=20",
                         "privacy.clip=0.5", "federation.rounds=3")
    _crash_at(monkeypatch, 4 + 1)
    with pytest.raises(KeyboardInterrupt):
        simulation.run(config, tmp_path)
    monkeypatch.undo()
    before = (tmp_path / "ledger.json").read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match=r"At most 1 more round\(s\) fit"):
        simulation.resume(tmp_path)
    assert (tmp_path / "ledger.json").read_bytes() == before
    simulation.resume(tmp_path, ["federation.rounds=2"])  # stop one round early: it fits
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 2


def test_resume_refuses_a_changed_privacy_setting_and_a_finished_run(tiny_config, tmp_path,
                                                                    monkeypatch):
    _crash_at(monkeypatch, 4 + 1)
    with pytest.raises(KeyboardInterrupt):
        simulation.run(tiny_config(*LOCAL_DP), tmp_path)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"privacy.clip = 2.0 differs from the run's 0.5"):
        simulation.resume(tmp_path, ["privacy.clip=2.0"])
    with pytest.raises(ConfigError, match=r"data.builtin_examples"):
        simulation.resume(tmp_path, ["data.builtin_examples=200"])
    simulation.resume(tmp_path, ["federation.eval_every=2"])  # touches no privacy
    with pytest.raises(ConfigError, match="finished"):
        simulation.resume(tmp_path)


def _privlora(*args: str) -> list[str]:
    return [sys.executable, "-m", "privlora", *args]


TINY_CLI = ["--set", "model.name=tiny-random", "--set", "model.dtype=float32",
            "--set", "data.builtin_examples=120", "--set", "data.max_eval=16",
            "--set", "train.local_steps=2", "--set", "train.batch_size=4",
            "--set", "federation.rounds=4", "--set", "privacy.mode=sample",
            "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.sample_rate=0.2",
            "--set", "privacy.reproducible_noise=true"]


@pytest.fixture(scope="module")
def whole_cli_run(tmp_path_factory) -> Path:
    """One uninterrupted `privlora run` of TINY_CLI, the reference of the killed runs."""
    out = tmp_path_factory.mktemp("whole")
    done = subprocess.run(_privlora("run", *TINY_CLI, "--out", str(out), "--overwrite"),
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_killed_cli_run_resumes_to_the_uninterrupted_adapter(tmp_path, whole_cli_run, how):
    """The real thing: `privlora run` as a process, killed once round 1's checkpoint exists
    (SIGKILL: no handler runs; SIGTERM: one line naming the round and the --resume command),
    then `privlora run --resume`; the adapter and ledger equal an uninterrupted run's."""
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_privlora("run", *TINY_CLI, "--out", str(cut)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (cut / "checkpoints" / "round_001").is_dir() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, how)
    _, err = proc.communicate(timeout=120)
    if how == signal.SIGTERM:
        assert proc.returncode == 143
        last = err.strip().splitlines()[-1]
        assert last.startswith("stopped after round ") and "of 4, epsilon " in last, err
        assert last.endswith(f"privlora run --resume {cut}")
        assert "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (cut / "summary.json").exists()
    resumed = subprocess.run(_privlora("run", "--resume", str(cut)), check=False,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _adapter_bytes(cut) == _adapter_bytes(whole_cli_run)
    assert (cut / "ledger.json").read_bytes() == (whole_cli_run / "ledger.json").read_bytes()
    a = load_file(str(cut / "checkpoints" / "round_004" / "adapter.safetensors"))
    b = load_file(str(whole_cli_run / "checkpoints" / "round_004" / "adapter.safetensors"))
    assert all(a[k].equal(b[k]) for k in b)
