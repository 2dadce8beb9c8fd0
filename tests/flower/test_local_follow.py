"""How ``privlora flower local`` follows a run's directory while the ServerApp writes it."""

from __future__ import annotations

import json
import os
import time

from privlora.flower.local import _follow


class _Finished:
    """A federation whose run has finished."""

    def status(self, run_id: int) -> str:
        return "finished:completed"


def test_an_overwritten_runs_old_rows_are_not_shown(tmp_path):
    old = tmp_path / "metrics.jsonl"
    old.write_text(json.dumps({"round": 7}) + "\n")
    (tmp_path / "summary.json").write_text("{}")
    past = time.time() - 60
    for path in (old, tmp_path / "summary.json"):
        os.utime(path, (past, past))
    shown: list[dict] = []
    _follow(_Finished(), 1, tmp_path, shown.append, 0.0, since=time.time())
    assert shown == []  # the old run's row, written before this run started, is skipped
    old.write_text(json.dumps({"round": 1}) + "\n")  # this run's first row
    _follow(_Finished(), 1, tmp_path, shown.append, 0.0, since=past + 1)
    assert shown == [{"round": 1}]
    shown.clear()
    _follow(_Finished(), 1, tmp_path, shown.append, 0.0)  # resume: every row is the run's own
    assert shown == [{"round": 1}]
