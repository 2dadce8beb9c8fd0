"""The run directory: refused when it already holds something, replaced only when asked."""

from __future__ import annotations

import json

import pytest
import torch

from privlora.errors import ConfigError
from privlora.run_dir import RunDir, check_target
from privlora.simulation import run


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_absent_or_empty_directory_is_fine(tmp_path):
    check_target(tmp_path / "new", overwrite=False)
    check_target(tmp_path, overwrite=False)


def test_a_directory_holding_anything_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"already holds \['metrics.jsonl'\].*--overwrite"):
        RunDir.create(tmp_path, "seed = 0\n")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_run_but_never_foreign_files(tmp_path):
    old = RunDir.create(tmp_path / "run", "seed = 1\n")
    old.checkpoint(1, {"x": torch.zeros(2)}, {"delta": 1e-5})
    new = RunDir.create(tmp_path / "run", "seed = 2\n", overwrite=True)
    assert (new.path / "config.toml").read_text() == "seed = 2\n"
    assert not (new.path / "checkpoints").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"not a privlora run's \(\['notes.txt'\]"):
        RunDir.create(tmp_path / "mine", "seed = 0\n", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_records_are_written_as_given(tmp_path):
    files = RunDir.create(tmp_path / "run", "seed = 0\n")
    files.log_round({"round": 0, "accuracy": 0.5, "loss": 1.0, "perplexity": 2.7})
    files.log_round({"round": 1, "accuracy": 0.75, "loss": 0.5, "perplexity": 1.6})
    files.finish({"task": "t"}, {"delta": 1e-5}, {"task": "t"})
    lines = (files.path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["accuracy"] for line in lines] == [0.5, 0.75]
    assert json.loads((files.path / "ledger.json").read_text()) == {"delta": 1e-5}
    assert (files.path / "report.png").stat().st_size > 0


def test_a_run_into_an_existing_run_is_refused_and_the_old_run_survives(tiny_config, tmp_path):
    config = tiny_config("federation.rounds=1", "train.local_steps=1")
    run(config, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="--overwrite"):
        run(config, tmp_path)
    assert snapshot(tmp_path) == before
    run(config, tmp_path, overwrite=True)
    assert (tmp_path / "summary.json").is_file()


def test_a_private_run_hides_when_each_round_ended(tiny_config, tmp_path):
    run(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1"), tmp_path)
    start = (tmp_path / "config.toml").stat().st_mtime
    entries = [*tmp_path.rglob("*"), tmp_path]
    assert len(entries) > 10 and all(p.stat().st_mtime == start for p in entries)


def test_the_ledger_counts_a_round_before_any_client_releases(tiny_config, tmp_path,
                                                              monkeypatch):
    from privlora import client

    real, calls = client.run_round, []

    def fails_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # round 2, second client: the round breaks off mid-way
            raise RuntimeError("site went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "run_round", fails_in_round_two)
    with pytest.raises(RuntimeError, match="site went away"):
        run(tiny_config("privacy.mode=local", "privacy.noise_multiplier=1"), tmp_path)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert {party: len(events) for party, events in ledger["events"].items()} == {
        f"client-{i}": 2 for i in range(4)}
