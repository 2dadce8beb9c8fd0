"""Training on every weight a bundle is consistent with, not on its grid (FedLPP off the grid).

A client that holds a quantized base knows each weight only up to its quantization bin: the
server's value lies somewhere in the interval that rounds to the code it received. An adapter
trained on the grid values alone fits that one error pattern and transfers poorly to the
server's weights (bench/fedlpp.py: q4_0 and nf4 lost 7-30 points of central accuracy). With
``quantization.base_noise = "bin"`` every local step trains on a fresh draw of each quantized
weight, uniform within its bin, so the adapter must serve the whole set of models the client
cannot tell apart, the server's among them.

Everything here is computed from the dequantized values a client already holds and the stored
type the manifest names: nothing about the server's weights beyond the bundle. The bins:

- GGML block types (blocks of 32 along a row): half a quantization step either side of the grid
  value. The step follows from the block's own values: its largest magnitude over 8 (Q4_0), 16
  (Q5_0), 127 (Q8_0) or 1 (TQ2_0), since that value's code is the scheme's extreme one; its
  range over 15 (Q4_1) or 31 (Q5_1), whose lowest and highest codes are both used.
- NF4 (blocks of 64 over the flattened tensor): from the midpoint to the next-lower level to
  the midpoint to the next-higher one (the extreme levels end at -1 and 1), times the block's
  absmax, which the block's largest magnitude equals.

Tensors stored as float32 (norms) and tensors the manifest marks ``identical`` (their grid is
the server's own values) are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privlora.quantization.schemes import NF4, NF4_BLOCK, nf4_levels

# stored type -> (block width, divisor of the block's largest magnitude, or of its range)
_BY_MAGNITUDE = {"Q4_0": 8.0, "Q5_0": 16.0, "Q8_0": 127.0, "TQ2_0": 1.0}
_BY_RANGE = {"Q4_1": 15.0, "Q5_1": 31.0}
GGML_BLOCK = 32


@dataclass
class _Binned:
    param: torch.Tensor  # the model's weight, overwritten by each draw
    grid: torch.Tensor  # the dequantized values the bundle holds (the training dtype)
    low: torch.Tensor  # the bin's lower end minus the grid value: per element, or per block
    width: torch.Tensor  # the bin's width, shaped as ``low`` (rows of ``blocks`` values)
    blocks: int  # values per row of low/width's view of the tensor


def ggml_bins(grid: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (low, width) per block of 32 for a GGML block type, each (blocks, 1): the bin of
    a value is [grid + low, grid + low + width], half a step either side of it (float32)."""
    rows = grid.float().reshape(-1, GGML_BLOCK)
    if type_name in _BY_MAGNITUDE:
        step = rows.abs().amax(dim=1, keepdim=True) / _BY_MAGNITUDE[type_name]
    elif type_name in _BY_RANGE:
        step = (rows.amax(dim=1, keepdim=True) - rows.amin(dim=1, keepdim=True)) / \
            _BY_RANGE[type_name]
    else:
        raise ValueError(f"no bins for stored type {type_name}")
    return -step / 2, step


def nf4_bins(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (low, width) per element for NF4, each (blocks, 64): from the midpoint below the
    element's level to the midpoint above it (to -1 or 1 at the ends), times its block's absmax
    (float32)."""
    levels = nf4_levels().float()
    edges = torch.cat([torch.tensor([-1.0]), (levels[1:] + levels[:-1]) / 2, torch.tensor([1.0])])
    blocks = grid.float().reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    codes = (scaled.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    low = (edges[codes] - levels[codes]) * absmax
    width = (edges[codes + 1] - edges[codes]) * absmax
    return low, width


def bins_of(grid: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (low, width) for a tensor stored as ``type_name``, over rows of its block
    (``ggml_bins``: one per block; ``nf4_bins``: one per element)."""
    if type_name == NF4.upper():
        return nf4_bins(grid)
    return ggml_bins(grid, type_name)


class BinNoise:
    """Redraws a client model's quantized weights within their bins (``draw``) and puts the grid
    values back (``restore``): the model a client evaluates and keeps is always the grid."""

    def __init__(self, weights: dict[str, torch.Tensor], types: dict[str, str]):
        """``weights``: the client model's parameters by Hugging Face name (``model_weights``);
        ``types``: the stored type of each tensor to redraw (others stay as they are)."""
        self._binned = []
        for name, type_name in types.items():
            param = weights[name]
            low, width = bins_of(param, type_name)
            blocks = NF4_BLOCK if type_name == NF4.upper() else GGML_BLOCK
            self._binned.append(_Binned(param, param.detach().clone(), low.half(), width.half(),
                                        blocks))

    @property
    def size(self) -> int:
        """How many weights each draw changes."""
        return sum(b.param.numel() for b in self._binned)

    @torch.no_grad()
    def draw(self, rng: torch.Generator) -> None:
        """Set every binned weight to a uniform draw within its bin (one ``rng`` stream)."""
        for b in self._binned:
            rows = b.grid.reshape(-1, b.blocks)
            u = torch.rand(rows.shape, generator=rng, dtype=torch.float32, device=rows.device)
            drawn = rows.float() + b.low.float() + u * b.width.float()
            b.param.copy_(drawn.reshape(b.param.shape))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the grid values back."""
        for b in self._binned:
            b.param.copy_(b.grid)


def bin_noise_for(model: torch.nn.Module, manifest) -> BinNoise:
    """Return the ``BinNoise`` of a model loaded from a bundle: every tensor the manifest stores
    quantized and not identical to the server's."""
    from privlora.quantization.bundle import model_weights

    types = {e.name: e.type for e in manifest.tensors if e.type != "F32" and not e.identical}
    return BinNoise(model_weights(model), types)
