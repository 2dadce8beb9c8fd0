"""Central DP aggregation (trusted server): clip each client's update, noise the sum once."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from privlora.privacy.mechanisms import add_noise, clip


def noisy_mean(deltas: Iterable[dict[str, torch.Tensor]], template: dict[str, torch.Tensor],
               clip_norm: float, noise_std: float, expected_count: float,
               generator: torch.Generator, secure: bool = False) -> dict[str, torch.Tensor]:
    """Return (sum_k clip(delta_k) + N(0, noise_std^2 I)) / expected_count (DP-FedAvg, eq. 2).

    McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018: the
    fixed denominator q * N (not the realised count) keeps one client's influence at clip / (qN).
    ``template`` gives the names and shapes when no client was sampled (noise is still added).
    ``deltas`` may be a generator: one client's update is held at a time besides the sum.
    """
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in template.items()}
    for delta in deltas:
        clipped, _ = clip(delta, clip_norm)
        total = {k: total[k] + clipped[k] for k in total}
    noisy = add_noise(total, noise_std, generator, secure=secure)
    return {k: v / expected_count for k, v in noisy.items()}
