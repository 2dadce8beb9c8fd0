"""The learning rate of each local step over the whole run (``train.lr_schedule``).

Pure: the rate depends only on the configured rate, the schedule and the step's index among the
run's ``federation.rounds x train.local_steps`` local steps, all public, so a schedule changes no
privacy accounting (under DP it scales a gradient that is already clipped and noised: post-
processing). Each client applies it to its own steps; the round number tells it where it is.
"""

from __future__ import annotations

import math


def scheduled_lr(lr: float, schedule: str, step: int, total: int) -> float:
    """The rate of local step ``step`` (0-based, counted over the run) of ``total``.

    "constant": ``lr`` at every step. "cosine": ``lr x (1 + cos(pi x step / total)) / 2``, from
    ``lr`` at the first step down towards zero at the last (half of ``lr`` halfway); a step
    beyond ``total`` stays at the last step's rate rather than climbing back (a resume may not
    change the rounds of a scheduled run: ``config.refuse_changes``).
    """
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"train.lr_schedule = {schedule!r}: expected 'constant' or 'cosine'")
    if total < 1 or step < 0:
        raise ValueError(f"step {step} of {total}: need total >= 1 and step >= 0")
    done = min(step, total - 1) / total
    return lr * 0.5 * (1.0 + math.cos(math.pi * done))
