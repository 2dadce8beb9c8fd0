"""The run directory, the user-visible contract of a run. Writes plain records; runs nothing.

``config.toml``, ``metrics.jsonl`` (one line per round), ``summary.json``, ``ledger.json``,
``adapter/`` (stock PEFT format, written by the runtime), ``checkpoints/round_NNN/``,
``report.png``. A directory that already holds anything is refused unless ``overwrite`` is
given, and then only if it holds nothing but a run's own files.

Every file a crash could leave half-written is written atomically (a temporary file, fsync,
rename); a round's checkpoint folder appears whole or not at all, so ``--resume`` always finds
a complete last round.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from privlora.errors import ConfigError

RUN_FILES = frozenset({"config.toml", "metrics.jsonl", "summary.json", "ledger.json", "adapter",
                       "checkpoints", "report.png", "sites", "audit.json", "audit.png"})
_PARTIAL = ".partial"  # a checkpoint folder being written; never read, removed on resume


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=str)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it before returning."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` so a crash leaves either the old file or the new one, never a mix: write a
    temporary file beside it, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_synced(tmp, data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class Checkpoint:
    """The last complete round of a run directory, as ``RunDir.checkpoint`` saved it."""

    round: int
    tensors: dict[str, torch.Tensor]
    ledger: dict | None  # the ledger after this round's spend
    state: dict  # what the round loop needs to go on (rows, evaluations, run id, sigma)


def last_checkpoint(path: Path) -> Checkpoint | None:
    """Return the newest complete checkpoint under ``path`` (None when there is none)."""
    folder = path / "checkpoints"
    rounds = sorted(int(d.name.split("_")[1]) for d in folder.glob("round_[0-9][0-9][0-9]")
                    if (d / "state.json").is_file()) if folder.is_dir() else []
    if not rounds:
        return None
    done = folder / f"round_{rounds[-1]:03d}"
    ledger = done / "ledger.json"
    return Checkpoint(rounds[-1], checkpoint_tensors(path, rounds[-1]),
                      json.loads(ledger.read_text()) if ledger.is_file() else None,
                      json.loads((done / "state.json").read_text()))


def checkpoint_tensors(path: Path, round_: int) -> dict[str, torch.Tensor]:
    """Return the flat global adapter the checkpoint of ``round_`` under ``path`` holds."""
    return load_file(str(path / "checkpoints" / f"round_{round_:03d}" / "adapter.safetensors"))


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
    def reopen(cls, path: Path, rows: list[dict]) -> RunDir:
        """Continue the run in ``path`` from a checkpoint whose metrics rows are ``rows``: the
        metrics file is rewritten to exactly those (a line the crash left is dropped) and any
        half-written checkpoint folder is removed."""
        for partial in (path / "checkpoints").glob(f"*{_PARTIAL}"):
            shutil.rmtree(partial)
        atomic_write(path / "metrics.jsonl", "".join(_json(r) + "\n" for r in rows))
        return cls(path, list(rows))

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
            atomic_write(self.path / "ledger.json", _json(ledger, indent=1))

    def checkpoint(self, round_: int, tensors: dict[str, torch.Tensor],
                   ledger: dict | None, state: dict | None = None) -> int:
        """Save the global adapter (flat safetensors), the ledger and the loop's ``state`` for
        this round; return the bytes written. The folder is written under a temporary name,
        fsynced and renamed: a crash leaves the previous round as the last complete one."""
        root = self.path / "checkpoints"
        folder, partial = root / f"round_{round_:03d}", root / f"round_{round_:03d}{_PARTIAL}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        files = {"adapter.safetensors": save({k: v.contiguous() for k, v in tensors.items()})}
        if ledger is not None:
            files["ledger.json"] = _json(ledger, indent=1).encode()
        if state is not None:
            files["state.json"] = _json(state, indent=1).encode()
        for name, data in files.items():
            _write_synced(partial / name, data)
        _fsync_dir(partial)
        if folder.exists():  # a round repeated after a resume replaces its old checkpoint
            shutil.rmtree(folder)
        os.replace(partial, folder)
        _fsync_dir(root)
        return sum(len(d) for d in files.values())

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
        atomic_write(self.path / "summary.json", _json(summary, indent=2))
        from privlora.plots import plot_rounds  # matplotlib: imported only when needed

        plot_rounds(self.rows, self.path / "report.png", title=summary["task"],
                    loss_key="label_loss" if summary.get("trained_loss") == "label" else "loss")
        if hide_times:
            start = (self.path / "config.toml").stat().st_mtime
            for entry in [*self.path.rglob("*"), self.path]:
                os.utime(entry, (start, start))


class Stopped(Exception):
    """The operator stopped the run (Ctrl-C or SIGTERM); ``code`` is the shell's exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stopped (exit {code})")
        self.code = code


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn Ctrl-C (SIGINT) and SIGTERM into ``Stopped`` for the block, so a run ends with one
    line instead of a traceback; what is written is written atomically, so nothing is lost."""

    def on_term(signum, frame):
        raise Stopped(128 + signal.SIGTERM)

    before = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        raise Stopped(128 + signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGTERM, before)


def stopped_line(path: Path, rounds: int, accountant: str) -> str:
    """Return the one line a stopped run prints: its last complete round, the epsilon its
    ledger holds, and the command that continues it."""
    done = last_checkpoint(path)
    if done is None:
        return (f"stopped before round 1 completed; nothing to resume: run again with --out "
                f"{path} --overwrite")
    ledger = path / "ledger.json"
    spent = ""
    if ledger.is_file():
        eps = json.loads(ledger.read_text())["epsilon"][accountant]["max"]
        spent = f", epsilon {eps:.3f} spent ({accountant}; ledger.json)" if isinstance(
            eps, float | int) else f", epsilon {eps} spent"
    return (f"stopped after round {done.round} of {rounds}{spent}; continue with: "
            f"privlora run --resume {path}")
