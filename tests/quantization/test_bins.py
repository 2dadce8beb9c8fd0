"""quantization.base_noise = "bin": the bins a client computes from its bundle hold the server's
weights, each draw stays inside them, and the grid is back after every round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from privlora.client import local_update
from privlora.privacy.mechanisms import seeded_generator
from privlora.quantization.bins import BinNoise, bin_noise_for, bins_of, ggml_bins, nf4_bins
from privlora.quantization.bundle import load_bundle, model_weights, write_bundle
from privlora.quantization.schemes import SCHEMES, decode, decode_nf4, encode, encode_nf4
from privlora.simulation import prepare


def _weights(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


def _scales(raw: np.ndarray, blocks: int) -> torch.Tensor:
    """Each GGML block's scale d as stored: the block's first two bytes, a float16 (read here
    from the raw bytes, independently of the bins' derivation from the values)."""
    per_block = raw.reshape(blocks, -1)[:, :2].copy()
    return torch.from_numpy(per_block.view(np.float16).astype(np.float32)).reshape(-1)


@pytest.mark.parametrize("type_name,divisor", [("Q4_0", 8), ("Q5_0", 16), ("Q8_0", 127)])
def test_ggml_bin_width_is_the_blocks_stored_step(type_name, divisor):
    x = _weights()
    raw = encode(x, SCHEMES[type_name.lower()])
    grid = decode(raw, SCHEMES[type_name.lower()]).reshape(x.shape)
    low, width = ggml_bins(grid, type_name)
    d = _scales(raw, x.numel() // 32).abs()
    assert torch.allclose(width.reshape(-1), d, rtol=1e-3, atol=1e-9)
    assert torch.allclose(low, -width / 2)


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_ggml_bins_hold_the_servers_weights(scheme):
    x = _weights(seed=1)
    qtype = SCHEMES[scheme]
    grid = decode(encode(x, qtype), qtype).reshape(x.shape)
    low, width = ggml_bins(grid, qtype.name)
    rows, g = x.reshape(-1, 32), grid.reshape(-1, 32)
    # gguf rounds with the exact scale and stores it as float16: up to 127 codes x 2^-11 of a
    # step (Q8_0), and the float16 minimum of Q4_1/Q5_1
    slack = 0.07 * width
    inside = (rows >= g + low - slack) & (rows <= g + low + width + slack)
    # Q4_0 and Q5_0 reach the largest magnitude on one side only: values beyond the top code's
    # bin on the other side (at most a few per cent) round to it from outside
    share = 0.97 if scheme in ("q4_0", "q5_0") else 1.0
    assert inside.float().mean() >= share
    assert bool((width > 0).all())


def test_nf4_bins_hold_the_servers_weights_and_tile_minus_one_to_one():
    x = _weights(seed=2)
    codes, absmax = encode_nf4(x)
    grid = decode_nf4(codes, absmax, tuple(x.shape))
    low, width = nf4_bins(grid)
    rows, g = x.reshape(-1, 64), grid.reshape(-1, 64)
    tol = 1e-6 * rows.abs().amax(dim=1, keepdim=True)
    assert bool(((rows >= g + low - tol) & (rows <= g + low + width + tol)).all())
    scale = torch.from_numpy(absmax).reshape(-1, 1)
    # the bin of the block's absmax element ends at +-absmax: no bin reaches beyond it
    reach = torch.maximum((g + low + width).amax(dim=1), -(g + low).amin(dim=1))
    assert torch.allclose(reach, scale.reshape(-1), rtol=1e-5)
    assert bool((width > 0).all())


def test_a_bin_half_as_wide_would_miss_the_servers_weights():
    x = _weights(seed=3)
    grid = decode(encode(x, SCHEMES["q4_0"]), SCHEMES["q4_0"]).reshape(x.shape)
    low, width = ggml_bins(grid, "Q4_0")
    rows, g = x.reshape(-1, 32), grid.reshape(-1, 32)
    inside = (rows >= g + low / 2) & (rows <= g + low / 2 + width / 2)
    assert inside.float().mean() < 0.6


def test_draws_stay_in_the_bins_are_centred_and_restore_puts_the_grid_back():
    grid = decode(encode(_weights(seed=4), SCHEMES["q4_0"]), SCHEMES["q4_0"]).reshape(64, 256)
    norm = torch.ones(256)
    weights = {"w": grid.clone(), "norm": norm.clone()}
    noise = BinNoise(weights, {"w": "Q4_0"})
    low, width = bins_of(grid, "Q4_0")
    rng, total = torch.Generator().manual_seed(0), torch.zeros_like(grid)
    for _ in range(200):
        noise.draw(rng)
        offset = (weights["w"] - grid).reshape(-1, 32)
        assert bool(((offset >= low - 1e-7) & (offset <= low + width + 1e-7)).all())
        total += weights["w"]
    spread = (width / 2).expand(-1, 32).reshape(grid.shape)
    # the mean of 200 uniform draws: within 5 standard errors (width / sqrt(12 * 200))
    assert bool(((total / 200 - grid).abs() <= 5 * spread * 2 / (12 * 200) ** 0.5).all())
    assert not torch.equal(weights["w"], grid)
    noise.restore()
    assert torch.equal(weights["w"], grid) and torch.equal(weights["norm"], norm)


def test_bins_skip_float32_and_identical_tensors(tmp_path, tiny_model, tokenizer):
    write_bundle(tiny_model, tokenizer, "q4_0", tmp_path / "b", "tiny")
    model, manifest = load_bundle(tmp_path / "b", "float32")
    noise = bin_noise_for(model, manifest)
    quantized = [e for e in manifest.tensors if e.type != "F32"]
    assert noise.size == sum(int(np.prod(e.shape)) for e in quantized if not e.identical)
    before = {n: w.clone() for n, w in model_weights(model).items()}
    noise.draw(torch.Generator().manual_seed(0))
    after = model_weights(model)
    for e in manifest.tensors:
        assert torch.equal(after[e.name], before[e.name]) == (e.type == "F32" or e.identical)


def test_a_round_with_bins_ends_on_the_grid_and_trains_differently(tiny_config):
    sim = prepare(tiny_config("quantization.base=q4_0", "quantization.base_noise=bin"))
    assert sim.base_noise is not None
    assert all(s.spec.base_noise is sim.base_noise for s in sim.sites)
    grid = {n: p.detach().clone() for n, p in sim.handles.model.named_parameters()}
    site = sim.sites[0]

    def update(spec):
        def rng(purpose):
            return seeded_generator(0, 1, 0, purpose)

        return local_update(sim.handles, sim.init, site.examples, spec, rng("batches"),
                            rng("noise"), sim.tokenizer.pad_token_id, None, rng("bins")).delta

    on_bins = update(site.spec)
    after = dict(sim.handles.model.named_parameters())
    assert all(torch.equal(after[n], grid[n]) for n in grid if "lora_" not in n)
    on_grid = update(dataclasses.replace(site.spec, base_noise=None))
    assert any(not torch.equal(on_bins[n], on_grid[n]) for n in on_grid)
    again = update(site.spec)  # the same generators: the same draws
    assert all(torch.equal(on_bins[n], again[n]) for n in on_bins)


