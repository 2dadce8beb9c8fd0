"""The mechanisms a client runs itself: DP-SGD steps (sample mode) and a noised release (local).

Each takes only public, configured constants and what it is given: neither knows how many
examples the client holds, so nothing released depends on that count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from privlora.privacy.mechanisms import add_noise, clip


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD inside local training (Abadi et al. 2016, Alg. 1) with Poisson sampling at rate q.

    ``divisor`` is the configured expected batch (``train.batch_size``): a constant, so the noise
    scale of a step, sigma * clip / divisor, is the same for every client whatever its size.
    """

    clip: float
    noise_multiplier: float
    sample_rate: float
    divisor: float
    secure: bool  # noise and Poisson draws from the OS CSPRNG (generators then ignored)

    def noisy_gradient(self, clipped_sum: dict[str, torch.Tensor],
                       noise_rng: torch.Generator) -> dict[str, torch.Tensor]:
        """Return (sum of clipped per-example gradients + N(0, (sigma C)^2 I)) / divisor."""
        noisy = add_noise(clipped_sum, self.noise_multiplier * self.clip, noise_rng, self.secure)
        return {name: g / self.divisor for name, g in noisy.items()}


@dataclass(frozen=True)
class LocalDP:
    """Local DP on the client's whole release: joint clip to C, N(0, (sigma 2C)^2) per coordinate.

    Under replace-one-release any two clipped updates differ by up to 2C: that is the
    sensitivity, so the noise std is sigma x 2 x clip.
    """

    clip: float
    noise_multiplier: float
    secure: bool

    def release(self, update: dict[str, torch.Tensor],
                noise_rng: torch.Generator) -> tuple[dict[str, torch.Tensor], bool]:
        """Return the noised, clipped update and whether it was finite (else it counts as 0)."""
        clipped, norm = clip(update, self.clip)
        noised = add_noise(clipped, self.noise_multiplier * 2 * self.clip, noise_rng, self.secure)
        return noised, math.isfinite(norm)
