"""Progress display over rounds, clients and local steps (rich), and the end-of-run summary.

The display is the operator's console, not a published file: under DP its step rate and times
follow the realised batch sizes, like the console timestamps (see the README's privacy section).
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from privlora.config import RunConfig

console = Console(stderr=True)


class RichProgress:
    """Three bars (rounds; clients in the round; a client's local steps, with tokens/s and the
    round's time to go) and one logged line per round."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        self._tokens = 0

    def __enter__(self) -> Self:
        self.bar.__enter__()
        self.rounds = self.bar.add_task("rounds", total=self.config.federation.rounds, rate="")
        self.client_task = self.bar.add_task("clients", total=0, rate="")
        self.step_task = self.bar.add_task("steps", total=0, rate="")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def clients(self, round_: int, ids: list[int]):
        self.bar.reset(self.client_task, total=len(ids), description=f"round {round_} clients")
        for k, cid in enumerate(ids, start=1):
            self.bar.reset(self.step_task, total=self.config.train.local_steps, rate="",
                           description=f"client {k} of {len(ids)} steps")
            self._tokens = 0
            yield cid
            self.bar.advance(self.client_task)

    def step(self, tokens: int) -> None:
        """Count one local step of ``tokens`` tokens (called by the client's training loop)."""
        self._tokens += tokens
        self.bar.advance(self.step_task)
        elapsed = self.bar.tasks[self.step_task].elapsed or 0.0
        rate = f"{self._tokens / elapsed:,.0f} tok/s" if elapsed > 0 else ""
        self.bar.update(self.step_task, rate=rate)

    def resumed(self, round_: int) -> None:
        """Start the rounds bar at a resumed run's last complete round."""
        self.bar.update(self.rounds, completed=round_)
        console.log(f"resumed after round {round_}")

    def round_done(self, round_: int, result, epsilon: float | None) -> None:
        self.bar.advance(self.rounds)
        eps = f"  epsilon {epsilon:.3f}" if epsilon is not None else ""
        if result is None:  # not evaluated this round (federation.eval_every)
            console.log(f"round {round_}: trained [{self.config.federation.aggregation}]{eps}")
            return
        acc = f"acc {100 * result.accuracy:5.1f}%  " if result.accuracy is not None else ""
        loss = (f"label loss {result.label_loss:.4f}" if self.config.train.label_only
                else f"loss {result.loss:.4f}")
        console.log(f"round {round_}: {acc}{loss}  "
                    f"[{self.config.federation.aggregation}]{eps}")


def print_summary(summary: dict, out_dir: Path) -> None:
    """Print zero-shot vs final metrics, epsilon and communication as a table."""
    table = Table(title=f"privlora run: {summary['task']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    z, f = summary["zero_shot"], summary["final"]
    if f["accuracy"] is not None:
        table.add_row("zero-shot accuracy", f"{100 * z['accuracy']:.1f}%")
        table.add_row("federated accuracy", f"{100 * f['accuracy']:.1f}%")
        table.add_row("always the most common label", f"{100 * summary['majority_class_accuracy']:.1f}%")
    if summary.get("trained_loss") == "label":  # the loss it trained, then the one it did not
        table.add_row("eval loss over the label words (trained)",
                      f"{z['label_loss']:.3f} -> {f['label_loss']:.3f}")
        table.add_row("eval loss of the whole answer (not trained)",
                      f"{z['loss']:.3f} -> {f['loss']:.3f}")
    else:
        drop = (summary.get("loss_drop") or {}).get("se")
        table.add_row("eval loss (zero-shot -> final)", f"{z['loss']:.3f} -> {f['loss']:.3f}"
                      + ("" if drop is None else f" (fall +/- {drop:.3f}, 1 standard error)"))
    if summary["privacy"]:
        p = summary["privacy"]
        table.add_row("privacy mode", f"{p['mode']} ({p['neighbouring']})")
        table.add_row("noise multiplier", f"{p['noise_multiplier']:.4f}")
        table.add_row("epsilon spent (PLD / RDP)",
                      f"{_num(p['epsilon_spent_pld'])} / {_num(p['epsilon_spent_rdp'])} "
                      f"at delta {p['delta']}")
    c = summary["communication"]
    table.add_row("uploaded (all clients)", _mb(c["bytes_up_total"]))
    table.add_row("downloaded (all clients)", _mb(c["bytes_down_total"]))
    table.add_row("full fine-tuning would upload", _mb(c["full_finetune_bytes_up_total"]))
    if c["ratio_up_vs_full"]:
        table.add_row("upload vs full fine-tuning", f"{c['ratio_up_vs_full']:.5f}x "
                      f"({1 / c['ratio_up_vs_full']:.0f}x less)")
    m = summary.get("model_privacy")
    if m and "bundle_bytes" in m:
        table.add_row(f"base model sent to clients ({m['base_scheme']})",
                      f"{_mb(m['bundle_bytes'])} (weights {m['bundle_vs_full_precision']:.3f}x "
                      "float32)")
    if m and m["client_visible"]["accuracy"] is not None:
        table.add_row("client-visible accuracy" + (" (quantized base)" if "bundle_bytes" in m
                                                   else ""),
                      f"{100 * m['client_visible']['accuracy']:.1f}% (base alone "
                      f"{100 * m['client_base']['accuracy']:.1f}%)")
    if m and m["general_perplexity_ratio"] is not None:
        table.add_row("general-text perplexity central -> client-visible",
                      f"{m['central']['general_perplexity']:.2f} -> "
                      f"{m['client_visible']['general_perplexity']:.2f}")
    if summary["wall_seconds"] is not None:  # hidden under client-level DP
        table.add_row("wall time", f"{summary['wall_seconds']:.0f} s")
    table.add_row("run directory", str(out_dir))
    Console().print(table)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)
