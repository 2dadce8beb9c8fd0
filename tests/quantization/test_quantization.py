"""FedLPP: the quantized base-model bundle, the adapter and uplink codecs."""

from __future__ import annotations

import json
import math
import shutil
import sys

import gguf
import numpy as np
import pytest
import torch

from privlora.errors import BundleError, InvalidUpdate
from privlora.protocol import Payload
from privlora.quantization import codec
from privlora.quantization.bundle import (
    MANIFEST,
    MODEL_FILE,
    load_bundle,
    model_weights,
    predicted_bytes,
    write_bundle,
)
from privlora.quantization.schemes import (
    BASE_SCHEMES,
    SCHEMES,
    bits_per_weight,
    block_error_bound,
    decode,
    decode_nf4,
    encode,
    encode_nf4,
    nf4_error_bound,
    tensor_type,
)
from tests.builders import tiny_llama

Q = gguf.GGMLQuantizationType


@pytest.fixture()
def bundle(tmp_path, tiny_model, tokenizer):
    """A q4_0 bundle of the tiny Llama, and the float32 weights it was made from."""
    weights = {k: v.clone() for k, v in model_weights(tiny_model).items()}
    write_bundle(tiny_model, tokenizer, "q4_0", tmp_path / "bundle", "tiny-random")
    return tmp_path / "bundle", weights


def test_bits_per_weight_are_gguf_block_sizes():
    assert bits_per_weight(Q.Q8_0) == 8.5 and bits_per_weight(Q.Q4_0) == 4.5
    assert bits_per_weight(Q.Q4_1) == 5.0 and bits_per_weight(Q.TQ2_0) == 2.0625


def test_tensor_types_fall_back_where_rows_do_not_fit_the_blocks():
    assert tensor_type("q4_0", (64, 32)) == Q.Q4_0
    assert tensor_type("q4_0", (32,)) == Q.F32  # norms stay float32
    assert tensor_type("q4_0", (8, 40)) == Q.F32  # 40 is not a multiple of 32
    assert tensor_type("tq2_0", (8, 512)) == Q.TQ2_0
    assert tensor_type("tq2_0", (8, 576)) == Q.Q4_0  # ternary blocks are 256 wide
    assert tensor_type("none", (64, 32)) == Q.F32


@pytest.mark.parametrize("scheme", sorted(BASE_SCHEMES))
def test_bundle_size_is_what_the_bits_per_weight_predict(tmp_path, tiny_model, tokenizer, scheme):
    manifest = write_bundle(tiny_model, tokenizer, scheme, tmp_path / "b", "tiny-random")
    shapes = {k: tuple(v.shape) for k, v in model_weights(tiny_model).items()}
    predicted = predicted_bytes(shapes, scheme)
    size = (tmp_path / "b" / MODEL_FILE).stat().st_size
    assert size == manifest.model_bytes
    # GGUF's overhead: the header, one entry per tensor (name, dims, type, offset), 32-byte
    # alignment of each tensor's data
    overhead = 4096 + sum(len(name) + 8 * 4 + 32 + 32 for name in shapes)
    assert predicted <= size <= predicted + overhead


def _blocks_of_test_data(scheme: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    width = 512 if scheme == "tq2_0" else 64  # nf4 blocks are 64 wide
    x = torch.randn(48, width, generator=gen) * torch.logspace(-4, 1, 48)[:, None]
    x[3, 5] = 40.0  # one outlier in a block
    x[4] = 0.0  # an all-zero row
    x[5] = -0.25  # a constant row
    x[6] = torch.rand(width, generator=gen) + 3.0  # all positive, away from zero
    return x


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_round_trip_error_is_within_the_scheme_bound_in_every_block(scheme):
    x = _blocks_of_test_data(scheme)
    qtype = tensor_type(scheme, tuple(x.shape))
    assert qtype == SCHEMES[scheme]
    y = decode(encode(x, qtype), qtype)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    xb, yb = x.reshape(-1, block).numpy(), y.reshape(-1, block).numpy()
    err = np.abs(yb - xb).max(axis=1)
    bounds = np.array([block_error_bound(qtype, b) for b in xb])
    assert (err <= bounds).all(), f"block {int(np.argmax(err - bounds))} exceeds the bound"
    assert err[[4 * x.shape[1] // block]].max() == 0.0  # zeros come back exactly
    # the bound is not slack: some block comes within 30% of it (nearest-rounding half steps)
    assert (err / np.maximum(bounds, 1e-30)).max() > 0.7


def test_nf4_round_trip_is_within_half_the_widest_level_gap_per_block():
    x = _blocks_of_test_data("nf4")
    codes, absmax = encode_nf4(x)
    assert codes.nbytes == x.numel() // 2 and absmax.shape == (x.numel() // 64,)
    y = decode_nf4(codes, absmax, tuple(x.shape))
    xb, yb = x.reshape(-1, 64).numpy(), y.reshape(-1, 64).numpy()
    err = np.abs(yb - xb).max(axis=1)
    bounds = np.array([nf4_error_bound(b) for b in xb])
    assert (err <= bounds).all() and (err / np.maximum(bounds, 1e-30)).max() > 0.7


def test_nf4_bundle_holds_bitsandbytes_own_dequantization(tmp_path, tokenizer):
    """A model with 64-wide rows: the NF4 weights a client loads are exactly what bitsandbytes
    dequantizes from the stored codes and absmax, and differ from the originals."""
    import bitsandbytes.functional as bnb

    from privlora.quantization.bundle import ABSMAX

    model = tiny_llama(tokenizer)  # rows of 32 stay float32 under NF4
    write_bundle(model, tokenizer, "nf4", tmp_path / "b", "tiny-random")
    loaded, manifest = load_bundle(tmp_path / "b", dtype="float32")
    nf4 = [e for e in manifest.tensors if e.type == "NF4"]
    assert nf4, "the tiny model's 64-wide down_proj rows are NF4"
    reader = {t.name: t for t in gguf.GGUFReader(tmp_path / "b" / MODEL_FILE).tensors}
    for entry in nf4:
        state = bnb.QuantState(absmax=torch.tensor(np.array(reader[entry.name + ABSMAX].data)),
                               shape=torch.Size(entry.shape), blocksize=64, quant_type="nf4",
                               code=bnb.get_4bit_type("nf4", device="cpu"), dtype=torch.float32)
        codes = torch.tensor(np.array(reader[entry.name].data).view(np.uint8)).reshape(-1, 1)
        expected = bnb.dequantize_4bit(codes, state)
        got = model_weights(loaded)[entry.name]
        assert torch.equal(got, expected.reshape(got.shape))
        assert not torch.equal(got, model_weights(model)[entry.name])


def test_a_weaker_bound_would_fail():
    """The bound test can fail: half of Q4_0's documented worst case is exceeded somewhere."""
    x = _blocks_of_test_data("q4_0")
    y = decode(encode(x, Q.Q4_0), Q.Q4_0)
    xb, yb = x.reshape(-1, 32).numpy(), y.reshape(-1, 32).numpy()
    halved = np.array([block_error_bound(Q.Q4_0, b) / 2 for b in xb])
    assert (np.abs(yb - xb).max(axis=1) > halved).any()


def test_client_model_is_exactly_the_dequantized_bundle(tmp_path, tiny_model, tokenizer):
    """The client's weights are gguf's own dequantization of the file, bit for bit, and the
    load reads nothing but the bundle: the full-precision checkpoint the bundle was made from is
    deleted first, and every file Python opens during the load is recorded."""
    from privlora.models import load_model

    source = tmp_path / "full-precision"
    tiny_model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    write_bundle(load_model(str(source), "float32", "cpu"), tokenizer, "q4_0", tmp_path / "b",
                 str(source))
    shutil.rmtree(source)
    opened: list[str] = []
    listening = [True]

    def audit(event, args):  # an audit hook stays for the process: it stops recording after
        if listening[0] and event == "open" and isinstance(args[0], str | bytes):
            opened.append(str(args[0]))

    sys.addaudithook(audit)
    model, manifest = load_bundle(tmp_path / "b", dtype="float32")
    listening[0] = False
    reader = gguf.GGUFReader(tmp_path / "b" / MODEL_FILE)
    reference = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    loaded = model_weights(model)
    assert set(loaded) == set(reference) == {t.name for t in manifest.tensors}
    for name, value in loaded.items():
        np.testing.assert_array_equal(value.numpy(), reference[name].reshape(value.shape))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert opened and all(str(tmp_path / "b") in p or "full-precision" not in p for p in opened)
    assert not [p for p in opened if p.endswith((".safetensors", ".bin", ".pt"))]


def test_bundle_weights_differ_from_the_full_precision_ones_within_bounds(bundle):
    path, weights = bundle
    model, manifest = load_bundle(path, dtype="float32")
    loaded = model_weights(model)
    for entry in manifest.tensors:
        x, y = weights[entry.name], loaded[entry.name]
        if entry.type == "F32":
            assert torch.equal(x, y)
            continue
        assert not torch.equal(x, y)  # the client does not hold the full-precision values
        xb, yb = x.reshape(-1, 32).numpy(), y.reshape(-1, 32).numpy()
        bounds = np.array([block_error_bound(Q[entry.type], b) for b in xb])
        assert (np.abs(yb - xb).max(axis=1) <= bounds).all()


def test_damaged_bundle_is_refused_with_one_line(bundle):
    path, _ = bundle
    gguf_file = path / MODEL_FILE
    data = bytearray(gguf_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256 does not match") as err:
        load_bundle(path)
    assert "\n" not in str(err.value)


def test_truncated_bundle_is_refused(bundle):
    path, _ = bundle
    gguf_file = path / MODEL_FILE
    gguf_file.write_bytes(gguf_file.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(path)


def test_truncated_file_with_a_matching_manifest_is_refused_by_the_reader(bundle):
    """Even when the manifest's checksum is rewritten to match, a truncated GGUF cannot load."""
    path, _ = bundle
    gguf_file = path / MODEL_FILE
    gguf_file.write_bytes(gguf_file.read_bytes()[:-4096])
    manifest = json.loads((path / MANIFEST).read_text())
    from privlora.quantization.bundle import sha256_of

    manifest["files"][MODEL_FILE] = [gguf_file.stat().st_size, sha256_of(gguf_file)]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a readable GGUF file"):
        load_bundle(path)


def _reshaped(tensors: list[dict]) -> None:
    tensors[1]["shape"] = [16, 16]


def _reordered(tensors: list[dict]) -> None:
    tensors[1], tensors[2] = tensors[2], tensors[1]


@pytest.mark.parametrize("change", [_reshaped, _reordered])
def test_tensors_that_do_not_match_the_manifest_are_refused(bundle, change):
    """A manifest listing a tensor with another shape, or the tensors in another order."""
    path, _ = bundle
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest["tensors"])
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="do not match the manifest"):
        load_bundle(path)


def test_missing_manifest_and_existing_output_are_refused(bundle, tiny_model, tokenizer):
    path, _ = bundle
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(tiny_model, tokenizer, "q8_0", path, "tiny-random")
    (path / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(path)


def _payload() -> Payload:
    gen = torch.Generator().manual_seed(0)
    return Payload({"x.lora_B": torch.randn(24, 2, generator=gen),
                    "y.lora_B": torch.randn(7, 5, generator=gen) * 1e-3})


@pytest.mark.parametrize("bits", codec.UPLINK_BITS)
def test_stochastic_rounding_is_unbiased(bits):
    payload, draws = _payload(), 4000
    rng = torch.Generator().manual_seed(3)
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in payload.tensors.items()}
    for _ in range(draws):
        decoded = codec.unpack_update(codec.pack_update(payload, bits, rng), bits, payload)
        for k, v in decoded.tensors.items():
            step = codec._blocks(payload.tensors[k]).abs().amax(dim=1) / (2 ** (bits - 1) - 1)
            # each value lands on one of its two neighbouring levels
            assert (codec._blocks(v - payload.tensors[k]).abs() <= step[:, None] * 1.0001).all()
            total[k] += v.double()
    for k, x in payload.tensors.items():
        step = float(x.abs().max()) / (2 ** (bits - 1) - 1)
        # the mean of n draws is within 5 standard errors (std <= step / 2 per value)
        assert (total[k] / draws - x.double()).abs().max() < 5 * (step / 2) / math.sqrt(draws)


def test_nearest_rounding_would_be_biased():
    """The unbiasedness test can fail: deterministic rounding of the same values is biased."""
    x = torch.full((32,), 0.3)
    x[0] = 1.0  # scale 1/127: 0.3 * 127 = 38.1 -> 38, a bias of 0.1 steps in every draw
    _codes, scales = codec.stochastic_codes(x, 8, torch.Generator().manual_seed(0))
    nearest = (x / scales[0]).round() * scales[0]
    assert (nearest - x).abs()[1:].min() > 0.05 * float(scales[0])


def test_compressed_uplink_is_smaller_and_carries_no_meta_under_dp():
    payload = _payload()
    packed = codec.pack_update(payload, 4, torch.Generator())
    assert packed.meta == {}
    assert len(packed.to_bytes()) < len(payload.to_bytes())


@pytest.mark.parametrize("broken", ["missing scale", "wrong shape", "extra tensor", "wrong dtype"])
def test_malformed_compressed_uplink_is_refused(broken):
    payload = _payload()
    packed = dict(codec.pack_update(payload, 8, torch.Generator()).tensors)
    if broken == "missing scale":
        del packed["x.lora_B" + codec.SCALE]
    elif broken == "wrong shape":
        packed["x.lora_B"] = packed["x.lora_B"][:1]
    elif broken == "extra tensor":
        packed["z"] = torch.zeros(1)
    else:
        packed["x.lora_B"] = packed["x.lora_B"].float()
    with pytest.raises(InvalidUpdate):
        codec.unpack_update(Payload(packed), 8, payload)


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0"])
def test_adapter_downlink_codec_round_trips_within_the_bound(scheme):
    payload = Payload(_payload().tensors, {"frozen_a_sha256": "abc"})
    packed = codec.pack_adapter(payload, scheme)
    decoded = codec.unpack_adapter(Payload.from_bytes(packed.to_bytes()))
    assert decoded.meta == payload.meta
    qtype = SCHEMES[scheme]
    for k, x in payload.tensors.items():
        assert decoded.tensors[k].shape == x.shape
        xb, yb = codec._blocks(x).numpy(), codec._blocks(decoded.tensors[k]).numpy()
        bounds = np.array([block_error_bound(qtype, b) for b in xb])
        assert (np.abs(yb - xb).max(axis=1) <= bounds).all()
    assert codec.pack_adapter(payload, "none") is payload


@pytest.mark.parametrize("broken", ["too many blocks", "too few blocks", "wrong width"])
def test_malformed_adapter_downlink_is_refused(broken):
    packed = codec.pack_adapter(_payload(), "q8_0")
    tensors = dict(packed.tensors)
    raw = tensors["x.lora_B"]
    tensors["x.lora_B"] = {"too many blocks": torch.cat([raw, raw]), "too few blocks": raw[:1],
                           "wrong width": raw[:, :-2]}[broken]
    with pytest.raises(InvalidUpdate, match="x.lora_B"):
        codec.unpack_adapter(Payload(tensors, dict(packed.meta)))


@pytest.mark.parametrize("scheme", ["q8_0", "q4_1", "nf4"])
def test_weights_already_on_the_grid_are_reported_identical(tmp_path, tiny_model, tokenizer,
                                                            scheme):
    """Re-quantizing a dequantized bundle gives the same values (the built-in SmolLM2 is such a
    model for q4_1 and q8_0): the manifest says so per tensor, so nobody believes the bundle
    hides weights it hands over exactly."""
    first = write_bundle(tiny_model, tokenizer, scheme, tmp_path / "first", "tiny-random")
    assert not any(t.identical for t in first.tensors if t.type != "F32")
    on_grid, _ = load_bundle(tmp_path / "first", dtype="float32")
    second = write_bundle(on_grid, tokenizer, scheme, tmp_path / "second", "first")
    quantized = [t for t in second.tensors if t.type != "F32"]
    assert quantized and all(t.identical for t in quantized)


def test_nf4_without_bitsandbytes_names_the_extra(monkeypatch):
    from privlora.errors import ConfigError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(ConfigError, match=r"pip install 'privlora\[nf4\]'"):
        encode_nf4(torch.zeros(2, 64))
