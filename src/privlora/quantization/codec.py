"""Codecs for the adapter payloads: the global adapter on the downlink, the client's update on
the uplink. Pure functions from one Payload to another.

- Downlink (``quantization.adapter``): every tensor flattened into blocks of 32 values and
  quantized with one of gguf's block schemes (nearest rounding); the shapes ride in the
  payload's meta. The client trains from the decoded values and sends its update relative to
  them. The server adds that update to its full-precision factors; with ``exact``, which
  rebuilds each client's product change from the global factors, the change is measured from
  the full-precision start rather than the decoded one the client trained from (an error of the
  order of the update times the quantization error; clipping still bounds the sensitivity).
- Uplink (``quantization.uplink_bits`` 8 or 4): unbiased stochastic rounding to signed integer
  codes with one float32 scale per block of 32 values (the block's largest magnitude over
  2^(bits-1) - 1), so E[decode(encode(x))] = x. It runs on the update as released, after any DP
  noise: post-processing, no privacy cost. Its rounding draws come from the seeded generator,
  like every other non-privacy draw. The server decodes against the shapes it sent, so a
  private uplink still carries nothing beside its tensors.
"""

from __future__ import annotations

import json
import math

import torch
from gguf import GGML_QUANT_SIZES

from privlora.errors import InvalidUpdate
from privlora.protocol import Payload
from privlora.quantization.schemes import SCHEMES, decode, encode

BLOCK = 32
CODEC, SHAPES = "codec", "shapes"  # downlink meta keys
SCALE = ":scale"  # uplink: the scales of tensor NAME travel as NAME:scale
UPLINK_BITS = (8, 4)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """Flatten ``x`` and zero-pad it into rows of BLOCK values: (n_blocks, BLOCK) float32."""
    flat = x.detach().float().reshape(-1)
    pad = -flat.numel() % BLOCK
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, BLOCK)


def _unblock(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return rows.reshape(-1)[: math.prod(shape)].reshape(shape)


def pack_adapter(payload: Payload, scheme: str) -> Payload:
    """Quantize a downlink's tensors with gguf's ``scheme`` (identity for "none")."""
    if scheme == "none":
        return payload
    qtype = SCHEMES[scheme]
    tensors = {k: torch.from_numpy(encode(_blocks(v), qtype)) for k, v in payload.tensors.items()}
    shapes = {k: list(v.shape) for k, v in payload.tensors.items()}
    return Payload(tensors, {**payload.meta, CODEC: scheme, SHAPES: json.dumps(shapes)})


def unpack_adapter(payload: Payload) -> Payload:
    """Decode what ``pack_adapter`` sent (a payload without a codec passes through)."""
    if CODEC not in payload.meta:
        return payload
    meta = dict(payload.meta)
    scheme, shapes = meta.pop(CODEC), json.loads(str(meta.pop(SHAPES)))
    if scheme not in SCHEMES or set(shapes) != set(payload.tensors):
        raise InvalidUpdate(f"downlink codec {scheme!r} or its shapes do not match its tensors; "
                            "client and server must use the same quantization settings")
    qtype = SCHEMES[scheme]
    block, size = GGML_QUANT_SIZES[qtype]
    tensors = {}
    for name, raw in payload.tensors.items():
        shape = tuple(shapes[name])
        if tuple(raw.shape) != (math.ceil(math.prod(shape) / block), size) or raw.dtype != torch.uint8:
            raise InvalidUpdate(f"downlink tensor {name!r}: {tuple(raw.shape)} {raw.dtype} is not "
                                f"{scheme} blocks of a {shape} tensor; download it again")
        tensors[name] = _unblock(decode(raw.numpy(), qtype), shape)
    return Payload(tensors, meta)


def stochastic_codes(x: torch.Tensor, bits: int,
                     rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes, scales) with E[codes * scales] = x blockwise: codes are integers in
    [-L, L], L = 2^(bits-1) - 1, and each block's scale is its largest magnitude / L."""
    rows = _blocks(x)
    levels = 2 ** (bits - 1) - 1
    scales = rows.abs().amax(dim=1) / levels
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    y = rows / safe[:, None]  # in [-L, L]
    low = y.floor()
    up = torch.rand(y.shape, generator=rng) < (y - low)  # round up with probability y - floor(y)
    codes = (low + up.float()).clamp(-levels, levels)
    return codes, scales


def pack_update(payload: Payload, bits: int, rng: torch.Generator) -> Payload:
    """Compress an uplink by unbiased stochastic rounding (``bits`` 0: unchanged)."""
    if bits == 0:
        return payload
    tensors: dict[str, torch.Tensor] = {}
    for name, value in payload.tensors.items():
        codes, scales = stochastic_codes(value, bits, rng)
        if bits == 8:
            tensors[name] = codes.to(torch.int8)
        else:  # two 4-bit codes per byte, offset by 8 into 1..15
            nibbles = (codes + 8).to(torch.uint8).reshape(-1, BLOCK // 2, 2)
            tensors[name] = nibbles[..., 0] | (nibbles[..., 1] << 4)
        tensors[name + SCALE] = scales
    return Payload(tensors, dict(payload.meta))


def unpack_update(payload: Payload, bits: int, sent: Payload) -> Payload:
    """Decode a compressed uplink against the shapes the server ``sent``; refuse one whose
    tensors are not the codes and scales of exactly those tensors."""
    if bits == 0:
        return payload
    tensors = {}
    want = set(sent.tensors) | {k + SCALE for k in sent.tensors}
    if set(payload.tensors) != want:
        raise InvalidUpdate(f"compressed uplink has tensors {sorted(set(payload.tensors) ^ want)[:3]}"
                            " it should not have or lacks; a client must send the codes and scales "
                            "of exactly its downlink's tensors")
    for name, like in sent.tensors.items():
        n_blocks = math.ceil(like.numel() / BLOCK)
        codes, scales = payload.tensors[name], payload.tensors[name + SCALE]
        width, dtype = (BLOCK, torch.int8) if bits == 8 else (BLOCK // 2, torch.uint8)
        if (tuple(codes.shape) != (n_blocks, width) or codes.dtype != dtype
                or tuple(scales.shape) != (n_blocks,) or scales.dtype != torch.float32):
            raise InvalidUpdate(f"compressed uplink tensor {name!r}: codes {tuple(codes.shape)} "
                                f"{codes.dtype}, scales {tuple(scales.shape)} do not encode a "
                                f"{tuple(like.shape)} tensor at {bits} bits")
        if bits == 8:
            values = codes.float()
        else:
            values = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(n_blocks, BLOCK)
            values = values.float() - 8
        tensors[name] = _unblock(values * scales[:, None], tuple(like.shape))
    return Payload(tensors, dict(payload.meta))


def encoded_sizes(down: Payload, adapter_scheme: str, uplink_bits: int) -> tuple[int, int]:
    """Return the bytes of one uplink and of one downlink as encoded on the wire, for the plain
    downlink ``down``: they depend on its shapes (and meta) only, not on any value."""
    zero = Payload({k: torch.zeros_like(v) for k, v in down.tensors.items()})
    return (len(pack_update(zero, uplink_bits, torch.Generator()).to_bytes()),
            len(pack_adapter(down, adapter_scheme).to_bytes()))
