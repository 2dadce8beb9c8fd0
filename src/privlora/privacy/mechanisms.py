"""Pure DP mechanisms on flat tensor dicts: joint L2 clipping, Gaussian noise, seeded generators.

Tensors travel as ``dict[str, Tensor]`` (the wire format of ``lora.flatten``). Every function
returns new tensors and never mutates its inputs. Clipping bounds the joint L2 norm over *all*
tensors of one update (one scale factor), which is the sensitivity the Gaussian mechanism of
Dwork & Roth (2014, Thm. A.1) and DP-SGD (Abadi et al., 2016, Alg. 1) assume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from privlora.errors import ConfigError, InvalidUpdate

# Why: scaling in float32 rounds each coordinate by up to 2**-24 relative, which could lift a
# clipped norm a hair above C. Shrinking clipped updates by this margin keeps norm <= C exactly.
_CLIP_MARGIN = 1.0 - 2.0**-20


def joint_l2_norm(tensors: Mapping[str, Tensor]) -> float:
    """Return sqrt(sum of squares) over all tensors together, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for tensor in tensors.values():
        total += tensor.detach().double().pow(2).sum().cpu()
    return math.sqrt(total.item())


def clip(tensors: Mapping[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """Scale all tensors by one factor min(1, C / norm) so their joint L2 norm is at most C.

    Return the clipped tensors and the norm before clipping (Abadi et al., 2016, Alg. 1 line 6,
    applied to a whole update as in DP-FedAvg, McMahan et al., 2018, Alg. 1). An update whose
    norm is not finite becomes zero (a point within the clip bound, so the sensitivity holds and
    nothing aborts on private data); the returned norm tells the caller, who counts it locally.
    """
    _check_clip_norm(clip_norm)
    norm = joint_l2_norm(tensors)
    if not math.isfinite(norm):
        return {name: torch.zeros_like(t, dtype=torch.float32) for name, t in tensors.items()}, norm
    factor = _clip_factor(torch.tensor([norm], dtype=torch.float64), clip_norm).item()
    return {name: tensor * factor for name, tensor in tensors.items()}, norm


def clip_per_example(
    per_example: Mapping[str, Tensor], clip_norm: float
) -> tuple[dict[str, Tensor], Tensor]:
    """Clip each example's joint gradient to norm C and return (sum over examples, norms (B,)).

    Each tensor has a leading batch dimension B; example b's norm is taken over all tensors
    together (Abadi et al., 2016, Alg. 1 lines 5-6; the sum feeds line 7's noisy average). An
    example whose norm is not finite contributes zero (within the bound); its norm in the
    returned ``norms`` is not finite, so the caller can count it in a local log.
    """
    _check_clip_norm(clip_norm)
    if not per_example:
        raise InvalidUpdate("per-example gradients are empty; pass at least one tensor")
    batch_sizes = {name: tensor.shape[0] for name, tensor in per_example.items()}
    if len(set(batch_sizes.values())) != 1:
        raise InvalidUpdate(
            f"per-example tensors disagree on the batch dimension: {batch_sizes}; "
            "give every tensor the same leading dimension B"
        )
    squares = sum(t.detach().flatten(1).double().pow(2).sum(1) for t in per_example.values())
    norms = squares.sqrt()  # (B,)
    finite = torch.isfinite(norms)
    factors = torch.where(finite, _clip_factor(norms, clip_norm), 0.0)  # (B,) float64
    summed = {}
    for name, tensor in per_example.items():
        scale = factors.to(device=tensor.device, dtype=torch.float32)
        if not finite.all():  # 0 * nan is nan: drop those rows before the weighted sum
            tensor = torch.where(finite.view(-1, *[1] * (tensor.dim() - 1)).to(tensor.device),
                                 tensor, 0.0)
        # (B,) x (B, ...) -> (...): weighted sum over examples
        summed[name] = torch.einsum("b,b...->...", scale, tensor.float())
    return summed, norms


def gaussian_noise_like(
    tensors: Mapping[str, Tensor],
    std: float,
    generator: torch.Generator | None,
    secure: bool = False,
) -> dict[str, Tensor]:
    """Draw N(0, std^2) float32 noise shaped like each tensor (the Gaussian mechanism).

    Draw in sorted-name order so the noise depends on the generator, not on dict order. With
    ``secure`` the OS CSPRNG feeds a Box-Muller transform and ``generator`` is ignored; the
    result is then not reproducible, which is the point.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ConfigError(
            f"noise std = {std!r} must be finite and >= 0; check privacy.noise_multiplier "
            "and privacy.clip"
        )
    if not secure and generator is None:
        raise TypeError(
            "DP noise needs an explicit torch.Generator (got None); pass "
            "seeded_generator(run_seed, round, client_id, 'noise') or set secure=True"
        )
    noise: dict[str, Tensor] = {}
    for name in sorted(tensors):
        shape, device = tensors[name].shape, tensors[name].device
        if secure:
            draw = _secure_standard_normal(math.prod(shape)).reshape(shape)
        else:
            draw = torch.randn(
                shape, generator=generator, device=generator.device, dtype=torch.float32
            )
        noise[name] = (draw * std).to(device)
    return {name: noise[name] for name in tensors}


def add_noise(
    tensors: Mapping[str, Tensor],
    std: float,
    generator: torch.Generator | None,
    secure: bool = False,
) -> dict[str, Tensor]:
    """Return tensors + N(0, std^2) noise per coordinate, in float32 (see gaussian_noise_like)."""
    noise = gaussian_noise_like(tensors, std, generator, secure)
    return {name: tensor.float() + noise[name] for name, tensor in tensors.items()}


def seeded_generator(*key: int | str) -> torch.Generator:
    """Return a CPU generator seeded by hashing ``key``, e.g. (run_seed, round, client, "noise").

    Use SHA-256 (not Python's salted ``hash``) so the seed is the same in every process.
    """
    if not key:
        raise TypeError("seeded_generator needs at least one key part, e.g. (run_seed, 'noise')")
    for part in key:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(
                f"seeded_generator key part {part!r} has type {type(part).__name__}; "
                "use ints and strings only"
            )
    digest = hashlib.sha256(json.dumps(list(key)).encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "big") >> 1)  # 63-bit seed
    return generator


def _check_clip_norm(clip_norm: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(
            f"privacy.clip = {clip_norm!r} must be a finite number > 0; e.g. privacy.clip = 1.0"
        )


def _clip_factor(norms: Tensor, clip_norm: float) -> Tensor:
    """Return min(1, C / norm) (shrunk by a float32 margin where it clips); safe for norm = 0."""
    # Why: dividing by max(norm, C) never divides by zero, and equals C / norm where it clips.
    clipped = clip_norm / torch.clamp(norms, min=clip_norm) * _CLIP_MARGIN
    return torch.where(norms > clip_norm, clipped, torch.ones_like(norms))


def secure_uniform(count: int) -> Tensor:
    """Draw ``count`` uniform doubles in (0, 1) from the OS CSPRNG (os.urandom)."""
    bits = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return torch.from_numpy(((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53)


def uniform(count: int, generator: torch.Generator, secure: bool = False) -> Tensor:
    """Draw ``count`` uniforms for a privacy-relevant choice (Poisson sampling).

    Why: with a seeded generator, anyone holding the run seed can replay who was sampled, which
    voids amplification by sampling; ``secure`` draws from the OS CSPRNG instead.
    """
    if secure:
        return secure_uniform(count)
    return torch.rand(count, generator=generator, dtype=torch.float64)


def _secure_standard_normal(count: int) -> Tensor:
    """Draw ``count`` N(0, 1) float32 values from os.urandom via Box-Muller (1958)."""
    pairs = (count + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    # Top 53 bits -> uniform doubles in (0, 1); the +0.5 keeps u1 away from 0 for the log.
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(uniform[0]))
    angle = 2.0 * np.pi * uniform[1]
    normal = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
    return torch.from_numpy(normal.astype(np.float32))
