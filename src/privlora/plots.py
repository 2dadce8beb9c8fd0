"""Plot a run's per-round accuracy, loss and epsilon to report.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_rounds(rows: list[dict], out: Path, title: str, loss_key: str = "loss") -> None:
    """Draw accuracy (if any) and eval loss per evaluated round, with the epsilon spent.

    ``loss_key``: the loss the run trained ("loss" over the answer tokens, or "label_loss").
    """
    eps = rows[-1].get("epsilon")
    rows = [r for r in rows if r["loss"] is not None]  # rounds skipped by eval_every
    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    accuracy = [r["accuracy"] for r in rows]
    if all(a is not None for a in accuracy):
        axes[0].plot(rounds, [100 * a for a in accuracy], marker="o")
        axes[0].set_ylabel("eval accuracy (%)")
    else:
        axes[0].plot(rounds, [r["perplexity"] for r in rows], marker="o")
        axes[0].set_ylabel("eval perplexity")
    axes[1].plot(rounds, [r[loss_key] for r in rows], marker="o", color="tab:red")
    axes[1].set_ylabel("eval loss (label words)" if loss_key == "label_loss"
                       else "eval loss (answer tokens)")
    for ax in axes:
        ax.set_xlabel("round (0 = zero-shot)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}" + (f" — epsilon spent {eps:.2f}" if isinstance(eps, float) else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
