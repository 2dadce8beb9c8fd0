"""Quantization schemes by name: gguf's block quantizers, their bits per weight and error bounds.

The quantizers are gguf-py's (the llama.cpp project's Python package), not ours: ``encode`` and
``decode`` call ``gguf.quants.quantize`` / ``dequantize``. This module only picks a GGML type per
tensor and states, for the tests, the worst error each scheme allows in one block.

A tensor whose rows do not split into the scheme's blocks (32 values; 256 for the ternary TQ2_0)
falls back to ``FALLBACK`` (TQ2_0 -> Q4_0), and a 1-D tensor (a norm's weight) stays float32, as
llama.cpp does. The bundle's manifest records the type of every tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

Q = GGMLQuantizationType
SCHEMES: dict[str, GGMLQuantizationType] = {
    "q8_0": Q.Q8_0, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
    "tq2_0": Q.TQ2_0,
}
FALLBACK = {Q.TQ2_0: Q.Q4_0}  # ternary blocks are 256 wide: narrower rows take 4 bits


def half_error(v: float) -> float:
    """Return the most float16 rounding moves ``v``: half an ulp (2^-11 relative) for normal
    values, half the subnormal spacing (2^-25) below 2^-14, where tiny scales lose precision."""
    return max(abs(v) * 2.0**-11, 2.0**-25)


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Return the stored bits per value of a GGML type (scales included): Q4_0 4.5, Q8_0 8.5."""
    block, size = GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


def tensor_type(scheme: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    """Return the GGML type a tensor of ``shape`` is stored as under ``scheme`` ("none": F32)."""
    if scheme == "none" or len(shape) < 2:
        return Q.F32
    qtype = SCHEMES[scheme]
    while shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        if qtype not in FALLBACK:
            return Q.F32
        qtype = FALLBACK[qtype]
    return qtype


def encode(x: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a float tensor with gguf's quantizer: the raw bytes (rows, bytes per row)."""
    return quants.quantize(x.detach().float().cpu().numpy(), qtype)


def decode(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Dequantize raw GGML data with gguf's dequantizer: float32 values (rows, columns)."""
    return torch.from_numpy(np.array(quants.dequantize(raw, qtype), dtype=np.float32, copy=True))


def block_error_bound(qtype: GGMLQuantizationType, block: np.ndarray) -> float:
    """Return the largest |dequantize(quantize(x)) - x| gguf's rounding allows in one block.

    Half a step for nearest rounding; a whole step for the signed 4- and 5-bit codes (Q4_0,
    Q5_0), whose 2^b levels reach the block's largest magnitude on one side only; plus the
    float16 rounding of the block's scale (times the largest code) and minimum, which for
    blocks of tiny values (scale below 2^-14) is absolute, not relative.
    """
    amax = float(np.abs(block).max())
    lo, hi = float(block.min()), float(block.max())
    if qtype == Q.F32:
        return 0.0
    if qtype == Q.Q8_0:
        step, codes, slack = amax / 127, 127, 0.5
    elif qtype in (Q.Q4_0, Q.Q5_0):
        codes = 8 if qtype == Q.Q4_0 else 16
        step, slack = amax / codes, 1.0
    elif qtype in (Q.Q4_1, Q.Q5_1):
        codes = 15 if qtype == Q.Q4_1 else 31
        step, slack = (hi - lo) / codes, 0.5
        return step * slack + codes * half_error(step) + half_error(lo) + 1e-12
    elif qtype == Q.TQ2_0:
        step, codes, slack = amax, 1, 0.5
    else:
        raise ValueError(f"no error bound for {qtype.name}")
    return step * slack + codes * half_error(step) + 1e-12
