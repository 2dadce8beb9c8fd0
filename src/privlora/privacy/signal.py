"""Will a private run learn? The noise-to-signal of what is released, predicted before training.

A DP mechanism releases a clipped quantity of norm at most C plus Gaussian noise over all d
released coordinates. The noise norm concentrates at std x sqrt(d), so the ratio

    per release  = noise norm / C  of one released quantity, as the trained model receives it
    whole run    = per release / sqrt(n)

where n is how many independent releases are averaged or summed into the final adapter: a
consistent gradient direction adds up linearly over them, the noise only as sqrt(n). Per mode:

    sample  one DP-SGD step at one client:      sigma sqrt(d) / divisor;        n = steps x m
    client  one round's noised mean:            sigma sqrt(d) / m;               n = rounds
    local   one client's noised release:        2 sigma sqrt(d);                 n = rounds x m

with m the expected clients per round and ``divisor`` the expected batch (train.batch_size).
The signal side is an upper bound (every clipped contribution pointing the same way), so the
ratios are optimistic; the thresholds below come from measured runs (bench/README.md) and the
tables say wherever a call disagreed with the outcome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# whole-run ratios: at or below LEARNS every measured run learned; above NO_LEARNING none did.
# Fitted to those runs (docs/privacy.md): 0.25 until FiQA's auto run at 0.249 learned nothing
LEARNS = 0.2
NO_LEARNING = 1.0


@dataclass(frozen=True)
class NoiseToSignal:
    """The prediction for one plan and adapter shape."""

    release: str  # what one release is, in words ("one DP-SGD step at one client")
    coordinates: int  # d: released coordinates per client (B only under FFA)
    per_release: float  # noise norm / clip of one released quantity
    releases: float  # n: independent releases summed into the final adapter
    whole_run: float  # per_release / sqrt(n)
    divided_by: str  # what divides the per-release ratio linearly ("" if nothing does)
    counted: str  # what n counts

    @property
    def verdict(self) -> str:
        """'learns', 'marginal' or 'too noisy to learn', from the whole-run ratio."""
        return verdict(self.whole_run)

    def fixes(self, target: float = LEARNS) -> list[str]:
        """Return the smallest single change of each knob that brings the run to ``target``.

        The ratio is linear in the mode's divisor, in sqrt(d) and in 1 / sqrt(n), so each knob's
        factor follows from one division; epsilon is left to the caller (it needs the accountant).
        """
        factor = self.whole_run / target
        if factor <= 1:
            return []
        fewer = self.coordinates / factor**2
        fixes = [f"x{factor:.1f} {self.divided_by}"] if self.divided_by else []
        return [*fixes,
                (f"/{factor**2:.0f} released coordinates, to under {fewer:,.0f} (aggregation = "
                 "'ffa', a lower lora.rank, fewer lora.target_modules, lora.last_layers)"),
                f"x{factor**2:.1f} {self.counted} (each costs budget, so sigma rises)"]


def verdict(whole_run: float) -> str:
    """'learns', 'marginal' or 'too noisy to learn' for a whole-run noise-to-signal ratio."""
    if whole_run <= LEARNS:
        return "learns"
    if whole_run <= NO_LEARNING:
        return "marginal"
    return "too noisy to learn"


def noise_to_signal(release: str, per_release: float, releases: float, coordinates: int,
                    divided_by: str, counted: str) -> NoiseToSignal:
    """Return the prediction for ``releases`` releases of ratio ``per_release`` each."""
    return NoiseToSignal(release, coordinates, per_release, releases,
                         per_release / math.sqrt(releases), divided_by, counted)


def noise_norm_over_clip(noise_std_over_clip: float, coordinates: int) -> float:
    """Return E||N(0, s^2 I_d)|| / C ~ s sqrt(d) / C: the noise norm of one release over the clip."""
    return noise_std_over_clip * math.sqrt(coordinates)


def agreement(previous: torch.Tensor, current: torch.Tensor) -> float:
    """Return cos(previous, current) x sqrt(d) over the d coordinates that moved in either.

    Two independent isotropic noise vectors give about N(0, 1) (the cosine of random directions
    in d dimensions has standard deviation 1 / sqrt(d)); a direction the rounds share makes it
    grow with sqrt(d), and noise the training pushes back against makes it negative. Computed
    from the released global updates alone (already noised under DP): post-processing, no
    privacy cost.
    """
    moved = (previous != 0) | (current != 0)
    a, b = previous[moved].double(), current[moved].double()
    norms = float(a.norm() * b.norm())
    if norms == 0.0:
        return 0.0
    return float(a @ b) / norms * math.sqrt(int(moved.sum()))
