"""The run directory, the user-visible contract of a run. Writes plain records; runs nothing.

``config.toml``, ``metrics.jsonl`` (one line per round), ``summary.json``, ``ledger.json``,
``adapter/`` (stock PEFT format, written by the runtime), ``checkpoints/round_NNN/``,
``report.png``. A directory that already holds anything is refused unless ``overwrite`` is
given, and then only if it holds nothing but a run's own files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from privlora.errors import ConfigError

RUN_FILES = frozenset({"config.toml", "metrics.jsonl", "summary.json", "ledger.json", "adapter",
                       "checkpoints", "report.png"})


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=str)


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse ``path`` if it holds anything (a run or other files), unless overwriting a run.

    Touches nothing: a refused directory is left exactly as it was.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a directory; choose another --out")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ConfigError(
            f"--out {path} already holds {entries[:6]}; a new run would replace its adapter, "
            "ledger and metrics. Choose another --out, or pass --overwrite to replace that run"
        )
    foreign = [e for e in entries if e not in RUN_FILES]
    if foreign:
        raise ConfigError(
            f"--out {path} holds files that are not a privlora run's ({foreign[:6]}); "
            "--overwrite replaces only a run directory: choose another --out"
        )


@dataclass
class RunDir:
    """Writes a run's files; keeps the round rows for the summary plot."""

    path: Path
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, path: Path, config_toml: str, overwrite: bool = False) -> RunDir:
        """Check ``path`` (see ``check_target``), clear an old run if overwriting, start anew."""
        check_target(path, overwrite)
        if path.exists():
            for entry in path.iterdir():  # check_target allowed only a run's own files
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.toml").write_text(config_toml)
        (path / "metrics.jsonl").write_text("")
        return cls(path)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def log_round(self, row: dict) -> None:
        """Append one line to metrics.jsonl (and keep it for the plot)."""
        with (self.path / "metrics.jsonl").open("a") as fh:
            fh.write(_json(row) + "\n")
        self.rows.append(row)

    def save_ledger(self, ledger: dict | None) -> None:
        """Write ledger.json now (each round, before any release, and at the end)."""
        if ledger is not None:
            (self.path / "ledger.json").write_text(_json(ledger, indent=1))

    def checkpoint(self, round_: int, tensors: dict[str, torch.Tensor],
                   ledger: dict | None) -> None:
        """Save the global adapter (flat safetensors) and the ledger for this round."""
        folder = self.path / "checkpoints" / f"round_{round_:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(folder / "adapter.safetensors"))
        if ledger is not None:
            (folder / "ledger.json").write_text(_json(ledger, indent=1))

    def finish(self, summary: dict, ledger: dict | None, task_meta: dict,
               hide_times: bool = False) -> None:
        """Write summary.json, ledger.json, adapter/task.json and report.png.

        With ``hide_times`` (every private mode) each file and folder gets the modification time
        of config.toml, the run's start: the times at which checkpoints were written would
        otherwise tell how long each round took, which grows with the realised batch sizes
        (sample mode) or with how many clients took part (client mode).
        """
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        (self.adapter_dir / "task.json").write_text(_json(task_meta, indent=1))
        self.save_ledger(ledger)
        (self.path / "summary.json").write_text(_json(summary, indent=2))
        from privlora.report import plot_rounds  # matplotlib: imported only when needed

        plot_rounds(self.rows, self.path / "report.png", title=summary["task"],
                    loss_key="label_loss" if summary.get("trained_loss") == "label" else "loss")
        if hide_times:
            start = (self.path / "config.toml").stat().st_mtime
            for entry in [*self.path.rglob("*"), self.path]:
                os.utime(entry, (start, start))
