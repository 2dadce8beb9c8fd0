"""Central DP aggregation (trusted server): clip each client's update, noise the sum once."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from privlora.privacy.mechanisms import add_noise, clip

# Messages that stay with the party that logs them: never written to the run directory.
local_log = logging.getLogger("privlora.local")


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg at the server: joint clip per update, N(0, noise_std^2) on the sum, / qN."""

    clip: float
    noise_std: float
    expected_count: float  # q * N: a fixed denominator, whoever was sampled
    secure: bool  # noise from the OS CSPRNG (the generator is then ignored)

    def noisy_mean(self, updates: Iterable[dict[str, torch.Tensor]],
                   template: dict[str, torch.Tensor],
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Return (sum_k clip(u_k) + N(0, noise_std^2 I)) / expected_count (DP-FedAvg, eq. 2).

        McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018:
        the fixed denominator q * N (not the realised count) keeps one client's influence at
        clip / (qN). ``template`` gives names and shapes when no client was sampled (noise is
        still added). ``updates`` may be a generator: one update is held at a time besides the
        sum. A non-finite update contributes zero, which is within the clip bound, and is
        counted in the server's local log only.
        """
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in template.items()}
        skipped = 0
        for update in updates:
            clipped, norm = clip(update, self.clip)
            skipped += not math.isfinite(norm)
            total = {k: total[k] + clipped[k] for k in total}
        if skipped:
            local_log.warning("server: %d non-finite client update(s) counted as zero", skipped)
        noisy = add_noise(total, self.noise_std, generator, secure=self.secure)
        return {k: v / self.expected_count for k, v in noisy.items()}
