"""bench/fpb_unseen.py: the sentences it scores are ones no FPB run saw, and each share of the
gain is against the same seed's non-private run above the one shared floor."""

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
common = importlib.import_module("_common")
unseen = importlib.import_module("fpb_unseen")


@pytest.mark.skipif(not (common.FPB / "fpb_sentences_75agree.jsonl").is_file(),
                    reason="../shared/data/financial_phrasebank is not beside the repository")
def test_unseen_rows_are_not_in_the_file_the_runs_split():
    from privlora.data import read_jsonl

    split = {r["text"] for r in read_jsonl(common.FPB / "fpb_sentences_allagree.jsonl")}
    rows = common.fpb_unseen_rows()
    assert len(rows) == 1189
    assert not split & {r["text"] for r in rows}
    assert {r["label"] for r in rows} == {"negative", "neutral", "positive"}


def _row(cell, seed, accuracy):
    return {"cell": cell, "seed": seed, "accuracy": accuracy, "examples": 1000,
            "held_out_accuracy": 0.5, "macro_f1": 0.4}


def test_share_is_against_the_same_seeds_twin_above_the_floor():
    floor = {"examples": 1000, "majority": 0.6, "zero_shot": 0.4, "floor": 0.6}
    rows = [_row("nodp+auto", 0, 0.9), _row("nodp+auto", 1, 0.8),
            _row("sample-8+auto", 0, 0.84), _row("sample-8+auto", 1, 0.84),
            _row("sample-2+auto", 2, 0.7)]
    lines = {tuple(line.split(" | ")[:2]): line.split(" | ")
             for line in unseen.render(rows, floor).splitlines() if line.startswith("| ")}
    assert lines[("| sample-8+auto", "0")][4] == "80.0%"   # (0.84 - 0.6) / (0.9 - 0.6)
    assert lines[("| sample-8+auto", "1")][4] == "120.0%"  # its own seed's twin, not seed 0's
    assert lines[("| sample-2+auto", "2")][4] == "-"       # no twin on seed 2
    assert lines[("| sample-8+auto", "0")][3] == "1.2"     # sqrt(0.84 * 0.16 / 1000), in points


def test_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "sample-8+auto-seed0").mkdir()
    with pytest.raises(SystemExit, match="not a bench/utility.py run directory"):
        unseen.run_name(tmp_path / "sample-8+auto-seed0")
    run = tmp_path / "sample-8+auto-seed3"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "task.json").write_text("{}")
    assert unseen.run_name(run) == ("sample-8+auto", 3)
