"""The base-model bundle a client receives (FedLPP): quantized weights in a GGUF file, a manifest.

A bundle is a directory::

    model.gguf      every weight of the model, quantized by gguf-py's quantizers, or for NF4
                    by bitsandbytes' (stored as int8 codes + a float32 absmax tensor); 1-D
                    norms and rows that fit no block stay float32; Hugging Face tensor names
    config.json     the model's Hugging Face config (shapes, no weights)
    tokenizer files the tokenizer, saved by ``save_pretrained``
    manifest.json   scheme, per-tensor stored type and shape (and whether the quantized values
                    equal the server's), every file's size and SHA-256

``write_bundle`` makes one from the server's model; ``load_bundle`` is all a client needs: it
verifies the manifest (every file's checksum, then every tensor's name, type and shape) and
builds the model from the dequantized values only, so the weights a client holds are the
quantized ones, nothing finer: unless the server's own weights already lie on the scheme's grid
(the built-in SmolLM2 ships as a Q4_1/Q8_0 GGUF), which the manifest records per tensor
(``identical``). The GGUF file is a standard GGUF container (any GGUF reader lists its tensors
and dequantizes the GGML-typed ones), but with Hugging Face tensor names and no llama.cpp
architecture metadata, llama.cpp's runtime would not run it as a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from privlora.errors import BundleError
from privlora.models import attention_for, resolve_device, torch_dtype, train_dtype
from privlora.quantization.schemes import (
    BASE_SCHEMES,
    NF4,
    NF4_BLOCK,
    decode,
    decode_nf4,
    encode,
    encode_nf4,
    stored_bits,
    stored_type,
    tensor_type,
)

log = logging.getLogger(__name__)
MODEL_FILE, MANIFEST, CONFIG = "model.gguf", "manifest.json", "config.json"
FORMAT = "privlora-bundle-2"
_ARCH = "privlora"  # the GGUF architecture key: tensors carry Hugging Face names
_MAX_NAME = 63  # GGML_MAX_NAME - 1
ABSMAX = ".nf4_absmax"  # an NF4 weight NAME is stored as NAME (codes) and NAME.nf4_absmax


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    type: str  # stored type: a GGML type name (Q4_0, Q8_0, F32, ...) or NF4
    identical: bool = False  # the dequantized values equal the server's, bit for bit

    def stored(self) -> tuple[str, tuple[int, ...], str]:
        """What the GGUF file itself can show of this entry: name, shape, type."""
        return self.name, self.shape, self.type


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds: enough to verify it before any weight is read."""

    format: str
    scheme: str
    source: str  # the model the server quantized (its name; never its weights)
    tensors: tuple[TensorEntry, ...]
    files: dict[str, tuple[int, str]]  # every file but the manifest: (bytes, SHA-256)
    full_precision_bytes: int  # the same weights as float32, for the downlink comparison

    @property
    def model_bytes(self) -> int:
        """Bytes of the weights file, model.gguf."""
        return self.files[MODEL_FILE][0]

    @property
    def total_bytes(self) -> int:
        """Bytes a client downloads: every file, the manifest included."""
        return sum(size for size, _ in self.files.values()) + len(self.to_json().encode())

    @property
    def digest(self) -> str:
        """SHA-256 of the scheme and every file's checksum: equal digests, equal bundles."""
        content = json.dumps({"scheme": self.scheme, "files": self.files}, sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["tensors"] = tuple(TensorEntry(t["name"], tuple(t["shape"]), t["type"],
                                           bool(t["identical"])) for t in raw["tensors"])
        raw["files"] = {k: (int(v[0]), str(v[1])) for k, v in raw["files"].items()}
        return cls(**raw)


def model_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Return the model's distinct parameters by name (a tied output head counted once)."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=True)}


def predicted_bytes(shapes: dict[str, tuple[int, ...]], scheme: str) -> int:
    """Return the tensor bytes a bundle of these shapes takes under ``scheme`` (no header)."""
    return int(sum(math.prod(shape) * stored_bits(stored_type(scheme, shape)) / 8
                   for shape in shapes.values()))


def write_bundle(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scheme: str,
                 out: Path | str, source: str) -> Manifest:
    """Quantize every weight of ``model`` with ``scheme`` and write the bundle directory ``out``.

    The directory is written beside ``out`` and renamed into place, so a half-written bundle is
    never left under the final name.
    """
    if scheme not in BASE_SCHEMES:
        raise BundleError(f"quantization scheme {scheme!r} is not one of {sorted(BASE_SCHEMES)}")
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        weights = model_weights(model)
        entries = _write_gguf(weights, scheme, tmp / MODEL_FILE)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        full = sum(4 * int(w.numel()) for w in weights.values())
        files = {f.name: (f.stat().st_size, sha256_of(f)) for f in sorted(tmp.iterdir())}
        manifest = Manifest(FORMAT, scheme, source, entries, files, full)
        same = [e.name for e in entries if e.identical and e.type != "F32"]
        if same:
            log.warning("%d of %d quantized tensors come back bit-identical to the server's (its "
                        "weights already lie on the %s grid): clients hold those exactly, e.g. %s",
                        len(same), sum(e.type != "F32" for e in entries), scheme, same[0])
        (tmp / MANIFEST).write_text(manifest.to_json())
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_gguf(weights: dict[str, torch.Tensor], scheme: str,
                path: Path) -> tuple[TensorEntry, ...]:
    writer = gguf.GGUFWriter(path, _ARCH)
    writer.add_string("privlora.scheme", scheme)
    entries = []
    for name, weight in weights.items():
        if len(name) + len(ABSMAX) > _MAX_NAME:
            raise BundleError(f"tensor name {name!r} is longer than GGUF's {_MAX_NAME} characters")
        shape, kind = tuple(weight.shape), stored_type(scheme, tuple(weight.shape))
        if kind == NF4.upper():  # no GGML type: the codes and the absmax as plain tensors
            codes, absmax = encode_nf4(weight)
            writer.add_tensor(name, codes.view(np.int8))
            writer.add_tensor(name + ABSMAX, absmax)
            back = decode_nf4(codes, absmax, shape)
        else:
            qtype = tensor_type(scheme, shape)
            raw = encode(weight.reshape(-1, weight.shape[-1]) if weight.dim() > 1 else weight,
                         qtype)
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, raw.reshape(shape))
            else:
                writer.add_tensor(name, raw, raw_dtype=qtype)
            back = decode(raw, qtype)
        identical = torch.equal(back.reshape(shape), weight.detach().float().cpu())
        entries.append(TensorEntry(name, shape, kind, identical))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tuple(entries)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle: Path | str) -> Manifest:
    """Read and check a bundle's manifest and file digests; raise a one-line BundleError."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}; give a directory written by "
                          "`privlora quantize`")
    try:
        manifest = Manifest.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{path} is not a valid manifest ({err}); quantize the model again") \
            from None
    if manifest.format != FORMAT:
        raise BundleError(f"{path}: format {manifest.format!r}, this privlora reads {FORMAT!r}")
    if not {MODEL_FILE, CONFIG} <= set(manifest.files):
        raise BundleError(f"{path} lists no {MODEL_FILE} or {CONFIG}; quantize the model again")
    for name, (_, want) in manifest.files.items():
        file = bundle / name
        if not file.is_file():
            raise BundleError(f"{bundle}: {name} is missing; download the bundle again")
        if sha256_of(file) != want:
            raise BundleError(f"{file}: SHA-256 does not match the manifest (damaged or "
                              "truncated download); download the bundle again")
    return manifest


def read_weights(bundle: Path | str, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Return the dequantized float32 weights of a verified bundle, checked against the
    manifest: the same tensor names, GGML types and shapes, in the same order."""
    path = Path(bundle) / MODEL_FILE
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:
        raise BundleError(f"{path} is not a readable GGUF file ({err}); download it again") \
            from None
    found = [(t.name, tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name)
             for t in reader.tensors]
    want = [stored for entry in manifest.tensors for stored in _stored(entry)]
    if found != want:
        diff = next((f"{w} != {g}" for w, g in zip(want, found, strict=False) if w != g),
                    f"{len(want)} tensors listed, {len(found)} in file")
        raise BundleError(f"{path}: tensors do not match the manifest ({diff}); the bundle is "
                          "inconsistent, quantize the model again")
    data = {t.name: t for t in reader.tensors}
    weights = {}
    for entry in manifest.tensors:
        stored = data[entry.name]
        if entry.type == NF4.upper():
            weights[entry.name] = decode_nf4(stored.data.view(np.uint8),
                                             data[entry.name + ABSMAX].data, entry.shape)
        else:
            weights[entry.name] = decode(stored.data, stored.tensor_type).reshape(entry.shape)
    return weights


def _stored(entry: TensorEntry) -> list[tuple[str, tuple[int, ...], str]]:
    """The GGUF tensors that hold one manifest entry: itself, or NF4's codes and absmax."""
    if entry.type != NF4.upper():
        return [entry.stored()]
    numel = math.prod(entry.shape)
    return [(entry.name, (numel // 2,), "I8"),
            (entry.name + ABSMAX, (numel // NF4_BLOCK,), "F32")]


def load_bundle(bundle: Path | str, dtype: str = "auto",
                device: str = "cpu") -> tuple[PreTrainedModel, Manifest]:
    """Build the client's model from a bundle alone: verified, dequantized, frozen.

    Its weights are exactly the library's dequantization of the file (gguf-py's, bitsandbytes'
    for NF4), then cast to the training dtype; nothing else is read but the bundle's config.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    weights = read_weights(bundle, manifest)
    where = resolve_device(device)
    config = AutoConfig.from_pretrained(bundle)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(where))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(
        model_weights(model))
    if unexpected or set(missing) - tied:
        raise BundleError(f"{bundle}: the weights do not fit the bundle's config (missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device=where, dtype=torch_dtype(train_dtype(dtype, where)))
    model.requires_grad_(False)
    model.eval()
    return model, manifest


def distribute(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scheme: str,
               source: str, dtype: str, device: str) -> tuple[PreTrainedModel, Manifest]:
    """The simulation's downlink of the base model: write the bundle and load it back from the
    file, as a site would, so the clients' model is exactly what the bundle holds."""
    with tempfile.TemporaryDirectory(prefix="privlora-bundle-") as tmp:
        write_bundle(model, tokenizer, scheme, Path(tmp) / "bundle", source)
        return load_bundle(Path(tmp) / "bundle", dtype, device)
