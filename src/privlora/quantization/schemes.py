"""Quantization schemes by name: gguf's block quantizers, their bits per weight and error bounds.

The quantizers are gguf-py's (the llama.cpp project's Python package), not ours: ``encode`` and
``decode`` call ``gguf.quants.quantize`` / ``dequantize``. This module only picks a GGML type per
tensor and states, for the tests, the worst error each scheme allows in one block.

A tensor whose rows do not split into the scheme's blocks (32 values; 256 for the ternary TQ2_0)
falls back to ``FALLBACK`` (TQ2_0 -> Q4_0), and a 1-D tensor (a norm's weight) stays float32, as
llama.cpp does. The bundle's manifest records the type of every tensor.

NF4 (4-bit NormalFloat, QLoRA's code) is not a GGML type: it comes from bitsandbytes
(``pip install 'privlora[nf4]'``), in blocks of 64 with one float32 absmax each (no double
quantization), and is stored in the GGUF file as two plain tensors per weight (the packed codes
as int8, the absmax as float32). Chosen by measurement over torchao's NF4, which gives the same
codes: on a 1536 x 576 tensor, one thread, bitsandbytes quantized in 0.12 s and torchao in
0.55 s, after a 2.5 s import that also reports native libraries it cannot load here.
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
NF4, NF4_BLOCK = "nf4", 64
BASE_SCHEMES = (*SCHEMES, NF4)  # what the base-model bundle can use


def half_error(v: float) -> float:
    """Return the most float16 rounding moves ``v``: half an ulp (2^-11 relative) for normal
    values, half the subnormal spacing (2^-25) below 2^-14, where tiny scales lose precision."""
    return max(abs(v) * 2.0**-11, 2.0**-25)


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    """Return the stored bits per value of a GGML type (scales included): Q4_0 4.5, Q8_0 8.5."""
    block, size = GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


def stored_type(scheme: str, shape: tuple[int, ...]) -> str:
    """Return the type name a bundle stores a tensor of ``shape`` as: "NF4", or a GGML type's."""
    if scheme == NF4:
        return NF4.upper() if len(shape) >= 2 and shape[-1] % NF4_BLOCK == 0 else Q.F32.name
    return tensor_type(scheme, shape).name


def stored_bits(type_name: str) -> float:
    """Bits per value of a stored type: NF4 is 4 bits plus a float32 absmax per 64 values."""
    return 4 + 32 / NF4_BLOCK if type_name == NF4.upper() else bits_per_weight(Q[type_name])


def tensor_type(scheme: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    """Return the GGML type a tensor of ``shape`` is stored as under ``scheme`` ("none": F32)."""
    if scheme in ("none", NF4) or len(shape) < 2:
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


def _bnb():
    """Import bitsandbytes' functional API (its import-time log is silenced in
    ``privlora/__init__``); a one-line error names the extra to install."""
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        from privlora.errors import ConfigError

        raise ConfigError("scheme 'nf4' needs bitsandbytes: pip install 'privlora[nf4]'") from None
    return bnb


def encode_nf4(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Quantize with bitsandbytes' NF4 (blocks of 64): packed codes (uint8) and absmax (f32)."""
    bnb = _bnb()
    codes, state = bnb.quantize_4bit(x.detach().float().cpu().contiguous(), blocksize=NF4_BLOCK,
                                     quant_type="nf4", compress_statistics=False)
    return codes.reshape(-1).numpy(), state.absmax.float().numpy()


def decode_nf4(codes: np.ndarray, absmax: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize NF4 codes with bitsandbytes' own dequantizer: float32 values of ``shape``."""
    bnb = _bnb()
    state = bnb.QuantState(absmax=torch.from_numpy(np.array(absmax, dtype=np.float32)),
                           shape=torch.Size(shape), code=bnb.get_4bit_type("nf4", device="cpu"),
                           blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
    packed = torch.from_numpy(np.array(codes, dtype=np.uint8).reshape(-1, 1))
    return bnb.dequantize_4bit(packed, state).reshape(shape).float()


def nf4_levels() -> torch.Tensor:
    """Return NF4's 16 levels in [-1, 1], ascending (bitsandbytes' table)."""
    return _bnb().get_4bit_type("nf4", device="cpu").double()


def nf4_error_bound(block: np.ndarray) -> float:
    """Return the largest NF4 round-trip error in one block of 64: half the widest gap between
    neighbouring NF4 levels (0.723 to 1.0), times the block's absmax."""
    levels = nf4_levels()
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    return half_gap * float(np.abs(block).max()) * (1 + 1e-6) + 1e-12
