"""bench/model_size.py: the steps it measures run through the client's code on any shape, and
its DP/plain ratios pair rows of the same setting only."""

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
model_size = importlib.import_module("model_size")

TINY = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_a_memory_step_and_timed_pairs_on_a_tiny_shape(monkeypatch):
    monkeypatch.setitem(model_size.SHAPES, "tiny", TINY)
    row = model_size.step_memory("tiny", True, 2, 16, "float32", "auto")
    assert row["private"] and not row["checkpointing"]  # auto: off below CHECKPOINT_ABOVE
    assert row["parameters"] > 0 and row["step_peak_gb"] >= 0
    assert row["process_peak_gb"] == pytest.approx(row["weights_rss_gb"] + row["step_peak_gb"])
    seconds = model_size.step_times("tiny", 2, 16, "float32", "on", repeats=2)
    assert {k: len(v) for k, v in seconds.items()} == {"plain": 3, "dp": 3}  # warm-up + 2
    assert all(s > 0 for v in seconds.values() for s in v)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_an_nf4_step_loads_the_saved_shape_in_4_bits(monkeypatch, tmp_path):
    monkeypatch.setitem(model_size.SHAPES, "tiny", TINY)
    monkeypatch.setattr(model_size, "SHAPES_DIR", tmp_path)
    from privlora import models  # "nf4" computes as "auto" resolves: float32 here on any CPU

    monkeypatch.setattr(models, "native_bf16", lambda *args: False)
    model_size.save_shape("tiny")
    assert (tmp_path / "tiny" / "config.json").is_file()
    row = model_size.step_memory("tiny", True, 2, 16, "nf4", "auto")
    assert row["dtype"] == "nf4/float32" and row["private"] and row["step_peak_gb"] >= 0


def test_pairs_alternate_which_step_runs_first():
    assert [model_size.step_order(p) for p in range(3)] == [(False, True), (True, False),
                                                             (False, True)]


def _row(size, private, peak, seconds=None, dtype="bfloat16", setting="auto", **extra):
    row = {"size": size, "private": private, "batch": 4, "tokens": 128, "dtype": dtype,
           "checkpointing": setting == "on", "checkpointing_setting": setting,
           "parameters": {"1B": 1e9, "3B": 3e9, "8B": 8e9}[size], "weights_rss_gb": 1.0,
           "step_peak_gb": peak - 1.0, "process_peak_gb": peak, **extra}
    if seconds is not None:  # a warm-up, then two timed steps
        row.update(seconds=seconds, seconds_each=[99.0, seconds, seconds], repeats=2,
                   tokens_per_s=512 / seconds)
    return row


def test_the_time_ratio_is_the_median_over_pairs_without_the_warm_up():
    # a busy machine slowed pair 2 for both steps: per pair 1.1, 1.1, 1.2
    dp, plain = [50.0, 11.0, 33.0, 12.0], [1.0, 10.0, 30.0, 10.0]
    assert model_size.pair_ratio(dp, plain) == pytest.approx(1.1)


def test_ratios_pair_the_same_setting_and_skip_untimed_and_failed_rows():
    rows = [_row("1B", False, 3.0, 10.0), _row("1B", True, 3.3, 11.0),
            _row("1B", False, 2.0, 10.0, setting="on"), _row("1B", True, 2.5, setting="on"),
            _row("3B", False, 9.0, dtype="float32"), _row("3B", True, 9.0, dtype="bfloat16"),
            {**_row("8B", True, 0.0), "error": "killed"}]
    ratios = model_size.ratios(rows)
    assert [(q["size"], q["checkpointing"]) for q in ratios] == [("1B", False), ("1B", True)]
    assert ratios[0]["process_peak"] == pytest.approx(1.1)
    assert ratios[0]["step_memory"] == pytest.approx(2.3 / 2.0)
    assert ratios[0]["time"] == pytest.approx(1.1)
    assert ratios[1]["time"] is None  # the DP row was not timed


def test_the_largest_size_that_fits_ignores_failures():
    rows = [_row("1B", True, 3.0), _row("3B", True, 20.0), _row("3B", False, 18.0),
            {**_row("8B", True, 0.0), "error": "killed"}]
    assert model_size.largest_fitting(rows, True, 24.0) == "3B"
    assert model_size.largest_fitting(rows, True, 10.0) == "1B"
    assert model_size.largest_fitting(rows, True, 1.0) == "none"


def test_a_child_the_kernel_killed_counts_as_not_fitting_and_other_failures_stop(monkeypatch):
    import subprocess

    def finished(code):
        return lambda *a, **k: subprocess.CompletedProcess(a, code, stdout="", stderr="boom")

    monkeypatch.setattr(model_size.subprocess, "run", finished(-9))
    assert "out of memory" in model_size.child(["--size", "8B"])
    monkeypatch.setattr(model_size.subprocess, "run", finished(1))
    with pytest.raises(SystemExit, match="boom"):
        model_size.child(["--size", "8B"])
