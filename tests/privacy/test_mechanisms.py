"""Clipping, Gaussian noise and seeded generators, checked against direct formulas and statistics."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from privlora.errors import ConfigError, InvalidUpdate
from privlora.privacy.mechanisms import (
    add_noise,
    clip,
    clip_per_example,
    gaussian_noise_like,
    joint_l2_norm,
    seeded_generator,
)


def _tensors(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.lora_A": torch.randn(4, 7, generator=g) * scale,
        "layer.lora_B": torch.randn(9, 4, generator=g) * scale,
    }


def test_joint_l2_norm_covers_all_tensors():
    tensors = _tensors()
    flat = torch.cat([t.double().flatten() for t in tensors.values()])
    assert joint_l2_norm(tensors) == pytest.approx(math.sqrt((flat**2).sum().item()), rel=1e-12)
    assert joint_l2_norm({}) == 0.0


def test_clip_scales_jointly_to_the_bound_without_mutating():
    tensors = _tensors(scale=3.0)
    before = {k: v.clone() for k, v in tensors.items()}
    clipped, norm = clip(tensors, clip_norm=1.5)
    assert norm == pytest.approx(joint_l2_norm(before))
    assert joint_l2_norm(clipped) <= 1.5
    assert joint_l2_norm(clipped) == pytest.approx(1.5, rel=1e-5)
    factor = 1.5 / norm  # one factor for the whole update
    for name in tensors:
        torch.testing.assert_close(clipped[name], before[name] * factor, rtol=1e-5, atol=0)
        assert torch.equal(tensors[name], before[name])


def test_clip_leaves_small_and_zero_updates_unchanged():
    small = _tensors(scale=0.01)
    clipped, _ = clip(small, clip_norm=10.0)
    for name in small:
        assert torch.equal(clipped[name], small[name])
    zeros = {"w": torch.zeros(3, 3)}
    clipped, norm = clip(zeros, clip_norm=1.0)
    assert norm == 0.0 and torch.equal(clipped["w"], zeros["w"])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_rejects_bad_clip_norm(bad):
    with pytest.raises(ConfigError, match="privacy.clip"):
        clip(_tensors(), clip_norm=bad)
    with pytest.raises(ConfigError, match="privacy.clip"):
        clip_per_example({"w": torch.ones(2, 3)}, clip_norm=bad)


def test_a_non_finite_update_is_clipped_to_zero_and_reported_by_its_norm():
    # zero is within the clip bound, so the sensitivity holds and nothing aborts on private data
    clipped, norm = clip({"w": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}, 1.0)
    assert math.isnan(norm)
    assert all(torch.equal(t, torch.zeros(2)) for t in clipped.values())


def test_non_finite_examples_contribute_zero_to_the_clipped_sum():
    per_example = {"w": torch.tensor([[3.0, 4.0], [float("inf"), 1.0], [0.3, 0.4]]),
                   "b": torch.tensor([[0.0], [float("nan")], [0.0]])}
    summed, norms = clip_per_example(per_example, clip_norm=1.0)
    assert (~torch.isfinite(norms)).tolist() == [False, True, False]
    # example 0 clipped from norm 5 to 1, example 1 dropped, example 2 (norm 0.5) kept
    torch.testing.assert_close(summed["w"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]), rtol=1e-5,
                               atol=1e-6)
    assert torch.equal(summed["b"], torch.zeros(1))


def test_clip_per_example_matches_a_loop_over_examples():
    g = torch.Generator().manual_seed(1)
    # Example norms spread from well under to well over the bound, and one all-zero example.
    scales = torch.tensor([0.01, 0.5, 1.0, 4.0, 50.0, 0.0])
    per_example = {
        "a": torch.randn(6, 3, 5, generator=g) * scales.view(-1, 1, 1),
        "b": torch.randn(6, 8, generator=g) * scales.view(-1, 1),
    }
    before = {k: v.clone() for k, v in per_example.items()}
    clip_norm = 2.0
    summed, norms = clip_per_example(per_example, clip_norm)
    expected = {k: torch.zeros_like(v[0], dtype=torch.float64) for k, v in per_example.items()}
    for b in range(6):
        example = {k: v[b].double() for k, v in per_example.items()}
        norm = math.sqrt(sum((t**2).sum().item() for t in example.values()))
        assert norms[b].item() == pytest.approx(norm, rel=1e-12)
        factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        clipped_b = {k: t * factor for k, t in example.items()}
        assert joint_l2_norm(clip({k: v[b] for k, v in per_example.items()}, clip_norm)[0]) <= 2.0
        for k in expected:
            expected[k] += clipped_b[k]
    for k, value in expected.items():
        torch.testing.assert_close(summed[k].double(), value, rtol=1e-5, atol=1e-6)
        assert torch.equal(per_example[k], before[k])


def test_clip_per_example_keeps_every_norm_at_most_the_bound():
    g = torch.Generator().manual_seed(2)
    per_example = {"a": torch.randn(64, 10, 10, generator=g) * 1e3, "b": torch.randn(64, 3)}
    for clip_norm in (1e-3, 0.7, 1.0, 123.0):
        _, norms = clip_per_example(per_example, clip_norm)
        factors = torch.clamp(clip_norm / norms, max=1.0) * (1 - 2**-20)
        for b in range(64):  # re-clip each example alone and measure what leaves
            one = {k: v[b : b + 1] for k, v in per_example.items()}
            summed, _ = clip_per_example(one, clip_norm)
            assert joint_l2_norm(summed) <= clip_norm
            assert joint_l2_norm(summed) <= norms[b].item() * factors[b].item() * (1 + 1e-6)


def test_clip_per_example_rejects_ragged_batches():
    with pytest.raises(InvalidUpdate, match="batch dimension"):
        clip_per_example({"a": torch.ones(2, 3), "b": torch.ones(3, 3)}, clip_norm=1.0)


def test_noise_needs_an_explicit_generator():
    with pytest.raises(TypeError, match="explicit torch.Generator"):
        gaussian_noise_like(_tensors(), std=1.0, generator=None)
    with pytest.raises(TypeError, match="explicit torch.Generator"):
        add_noise(_tensors(), std=1.0, generator=None)


def test_noise_is_reproducible_and_independent_of_dict_order():
    tensors = _tensors()
    first = gaussian_noise_like(tensors, 0.5, seeded_generator(7, 0, 3, "noise"))
    reordered = dict(reversed(list(tensors.items())))
    second = gaussian_noise_like(reordered, 0.5, seeded_generator(7, 0, 3, "noise"))
    other = gaussian_noise_like(tensors, 0.5, seeded_generator(7, 0, 4, "noise"))
    assert list(second) == list(reordered)
    for name in tensors:
        assert first[name].dtype == torch.float32
        assert first[name].shape == tensors[name].shape
        assert torch.equal(first[name], second[name])
        assert not torch.equal(first[name], other[name])


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_the_requested_distribution(secure):
    std = 0.3
    noise = gaussian_noise_like(
        {"w": torch.zeros(400, 500)}, std, seeded_generator(0, "stats"), secure=secure
    )["w"].double()
    n = noise.numel()  # tolerances below are 5 or more standard errors: not flaky when secure
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    assert noise.std().item() == pytest.approx(std, rel=0.01)
    within_one = (noise.abs() < std).double().mean().item()
    assert within_one == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.005)
    kurtosis = ((noise / std) ** 4).mean().item()
    assert kurtosis == pytest.approx(3.0, abs=0.15)


def test_secure_noise_ignores_the_generator_and_is_not_reproducible():
    tensors = {"w": torch.zeros(101)}  # odd size: Box-Muller pairs must be trimmed
    a = gaussian_noise_like(tensors, 1.0, seeded_generator(1), secure=True)["w"]
    b = gaussian_noise_like(tensors, 1.0, seeded_generator(1), secure=True)["w"]
    c = gaussian_noise_like(tensors, 1.0, None, secure=True)["w"]
    assert a.shape == (101,) and a.dtype == torch.float32 and c.shape == (101,)
    assert not torch.equal(a, b)


def test_noise_rejects_bad_std():
    with pytest.raises(ConfigError, match="noise std"):
        gaussian_noise_like(_tensors(), -1.0, seeded_generator(0))
    zero = gaussian_noise_like(_tensors(), 0.0, seeded_generator(0))
    assert all(torch.count_nonzero(t) == 0 for t in zero.values())


def test_add_noise_adds_exactly_the_drawn_noise_without_mutating():
    tensors = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.ones(5)}
    before = {k: v.clone() for k, v in tensors.items()}
    noisy = add_noise(tensors, 2.0, seeded_generator(3, "noise"))
    noise = gaussian_noise_like(tensors, 2.0, seeded_generator(3, "noise"))
    for name, tensor in tensors.items():
        assert noisy[name].dtype == torch.float32
        torch.testing.assert_close(noisy[name], before[name].float() + noise[name])
        assert torch.equal(tensor, before[name])


def test_seeded_generator_hashes_the_key_with_sha256():
    key = (1234, 5, 17, "noise")
    digest = hashlib.sha256(json.dumps(list(key)).encode()).digest()
    assert seeded_generator(*key).initial_seed() == int.from_bytes(digest[:8], "big") >> 1
    assert seeded_generator(*key).initial_seed() < 2**63
    draws = [torch.rand(3, generator=seeded_generator(*key)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    # The key's structure matters: (1, 23) and (12, 3) or ("1", 23) must not collide.
    seeds = {seeded_generator(*k).initial_seed() for k in [(1, 23), (12, 3), ("1", 23), (123,)]}
    assert len(seeds) == 4


@pytest.mark.parametrize("bad", [(), (1.5,), (True,), (None,)])
def test_seeded_generator_rejects_ambiguous_keys(bad):
    with pytest.raises(TypeError):
        seeded_generator(*bad)
