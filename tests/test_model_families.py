"""Bring your own model: tiny random decoders of each common family, saved as HF directories.

For every family: the default LoRA targets exist, one private round (sample mode) runs and
saves a finite adapter that stock ``PeftModel.from_pretrained`` reloads to the same logits,
and the per-example gradients equal a brute-force loop of one backward per example.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    T5Config,
)

from privlora import lm, models
from privlora.architectures import DEFAULT_TARGETS, default_targets, parameter_count
from privlora.communication import full_finetune_bytes
from privlora.config import LoraSection, load_config
from privlora.data import Example, collate
from privlora.errors import ConfigError
from privlora.lm import causal_lm
from privlora.lora import attach, lora_linears, set_trainable, spec_of, unflatten, write_adapter
from privlora.models import gradient_checkpointing, load_model, weights_dtype
from privlora.privacy.mechanisms import clip_per_example, joint_l2_norm
from privlora.privacy.per_example import PerExampleGrads
from privlora.run_dir import last_checkpoint
from privlora.simulation import run
from tests.builders import live_activations, randomize_lora_b

# Shared by every family: 2 layers, 4 heads (2 key-value heads where the family has them),
# the built-in tokenizer's vocabulary and token ids
LAYERS, HEADS, HIDDEN, FFN = 2, 4, 32, 64
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
GQA = {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
       "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": 512}

FAMILIES: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama": lambda vocab: LlamaConfig(vocab_size=vocab, **GQA, **IDS),
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, **GQA, **IDS),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, **GQA, **IDS),
    "gemma": lambda vocab: GemmaConfig(vocab_size=vocab, head_dim=HIDDEN // HEADS, **GQA, **IDS),
    "phi3": lambda vocab: Phi3Config(vocab_size=vocab, **GQA, **IDS),
    "gpt2": lambda vocab: GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS,
                                     n_head=HEADS, n_positions=512, **IDS),
    "gpt_neox": lambda vocab: GPTNeoXConfig(vocab_size=vocab, hidden_size=HIDDEN,
                                            intermediate_size=FFN, num_hidden_layers=LAYERS,
                                            num_attention_heads=HEADS,
                                            max_position_embeddings=512, **IDS),
}

# Families checked in memory only (targets, and the answer-only forward against their own):
# each with a step after its LM head, or a module layout of its own
SIDE = {**IDS, "vocab_size": 256}
MORE_FAMILIES: dict[str, PretrainedConfig] = {
    "gemma2": AutoConfig.for_model("gemma2", head_dim=8, final_logit_softcapping=0.5, **GQA,
                                   **SIDE),
    "cohere": AutoConfig.for_model("cohere", logit_scale=0.0625, **GQA, **SIDE),
    "granite": AutoConfig.for_model("granite", logits_scaling=4.0, **GQA, **SIDE),
    "qwen3": AutoConfig.for_model("qwen3", head_dim=8, **GQA, **SIDE),
    "phi": AutoConfig.for_model("phi", **GQA, **SIDE),
    "mixtral": AutoConfig.for_model("mixtral", num_local_experts=2, num_experts_per_tok=1,
                                    **GQA, **SIDE),
    "opt": AutoConfig.for_model("opt", hidden_size=HIDDEN, ffn_dim=FFN, word_embed_proj_dim=HIDDEN,
                                num_hidden_layers=LAYERS, num_attention_heads=HEADS, **SIDE),
    "falcon": AutoConfig.for_model("falcon", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, **SIDE),
    "bloom": AutoConfig.for_model("bloom", hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                  **SIDE),
    "gptj": AutoConfig.for_model("gptj", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                 rotary_dim=4, **SIDE),
    "gpt_bigcode": AutoConfig.for_model("gpt_bigcode", n_embd=HIDDEN, n_layer=LAYERS,
                                        n_head=HEADS, **SIDE),
}

# model.dtype = "nf4" (4-bit bitsandbytes base) on one family per kind of adapted layer:
# separate projections, a fused one, and GPT-2's transposed Conv1D
NF4_FAMILIES = ("llama", "phi3", "gpt2")
WITH_NF4 = [(family, "float32") for family in FAMILIES] + [(f, "nf4") for f in NF4_FAMILIES]

# A private run small enough for seconds: 2 clients, 1 round of 2 DP-SGD steps
PRIVATE_ROUND = ("model.dtype=float32", "model.device=cpu", "data.builtin_examples=40",
                 "data.max_eval=4", "data.max_length=48", "federation.num_clients=2",
                 "federation.rounds=1", "train.local_steps=2", "train.threads=1",
                 "lora.rank=2", "privacy.mode=sample", "privacy.noise_multiplier=1.0",
                 "privacy.sample_rate=0.2")


@pytest.fixture(autouse=True)
def nf4_computes_in_float32(monkeypatch):
    """model.dtype = "nf4" computes as "auto" resolves: bf16 on a CPU with native bf16. These
    tests compare in float32 on every CPU."""
    monkeypatch.setattr(models, "native_bf16", lambda *args: False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    """Return a builder: family -> an HF directory of a tiny random model and the built-in
    tokenizer (saved once per family)."""
    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(FAMILIES[family](len(tokenizer)))
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[family] = path
        return built[family]

    return build


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_resolve_to_the_familys_attention(family, model_dir):
    model = load_model(str(model_dir(family)), "float32", "cpu")
    assert model.config.model_type == family
    spec = spec_of(LoraSection(), model)
    assert spec.target_modules == DEFAULT_TARGETS[family]
    handles = attach(model, spec, seed=0)
    assert len(handles.layers) == LAYERS * len(spec.target_modules)
    # an explicit choice always wins over the family's default
    assert spec_of(LoraSection(target_modules=("custom",)), model).target_modules == ("custom",)


@pytest.mark.parametrize(("family", "dtype"), WITH_NF4)
def test_private_round_saves_an_adapter_stock_peft_reloads(family, dtype, model_dir, tmp_path):
    name = str(model_dir(family))
    config = load_config(None, [f"model.name={name}", *PRIVATE_ROUND, f"model.dtype={dtype}"])
    summary = run(config, tmp_path / "run")
    assert summary["model_dtype"] == {"float32": "float32", "nf4": "nf4/float32"}[dtype]
    assert 0 < summary["privacy"]["epsilon_spent_pld"] < math.inf
    adapter = unflatten(last_checkpoint(tmp_path / "run").tensors)
    assert all(torch.isfinite(f.A).all() and torch.isfinite(f.B).all() for f in adapter.values())
    assert any(f.B.abs().sum() > 0 for f in adapter.values())  # it trained (noise included)

    model = load_model(name, dtype, "cpu")
    ours = attach(model, spec_of(config.lora, model), seed=0)
    write_adapter(ours, adapter)
    stock = PeftModel.from_pretrained(load_model(name, dtype, "cpu"),
                                      str(tmp_path / "run" / "adapter"))
    examples = [Example(tuple(range(5, 5 + n)), (7, 8, 2), None) for n in (9, 4)]
    batch = collate(examples, pad_id=2)
    with torch.no_grad():
        full = stock(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mine = ours.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        answer = lm.answer_logits(ours.model, batch)  # the training path: decoder, then head
    torch.testing.assert_close(mine, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(answer, full[batch.target_mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "released"), [("qwen2", ["v_proj"]), ("gpt2", ["c_attn"])])
def test_the_cli_runs_the_auto_private_recipe_with_no_modules_named(family, released, model_dir,
                                                                     tmp_path):
    """What a new user of another family writes: the model directory, epsilon 8 and the declared
    data size; auto picks the recipe, the family its modules (the value projection where it has
    one, GPT-2's fused c_attn otherwise)."""
    from typer.testing import CliRunner

    from privlora.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--model", str(model_dir(family)), "--set", "model.dtype=float32",
        "--set", "data.builtin_examples=120", "--set", "data.max_eval=8",
        "--set", "federation.rounds=1", "--set", "train.local_steps=2",
        "--set", "privacy.recipe=auto", "--set", "privacy.mode=sample",
        "--set", "privacy.target_epsilon=8", "--set", "privacy.delta=1e-3",
        "--set", "data.examples_per_client=24", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recipe: auto" in result.output
    saved = load_config(out / "config.toml")
    assert saved.federation.aggregation == "ffa" and saved.lora.rank == 2
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == released
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["mode"] == "sample" and 0 < privacy["epsilon_pld"] <= 8.0


@pytest.mark.parametrize("mode", ["client", "local"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_round_in_the_other_privacy_modes(family, mode, model_dir, tmp_path):
    overrides = [o for o in PRIVATE_ROUND if not o.startswith(("privacy.mode",
                                                                "privacy.sample_rate"))]
    config = load_config(None, [f"model.name={model_dir(family)}", *overrides,
                                f"privacy.mode={mode}"])
    summary = run(config, tmp_path / "run")
    assert 0 < summary["privacy"]["epsilon_spent_pld"] < math.inf
    adapter = unflatten(last_checkpoint(tmp_path / "run").tensors)
    assert all(torch.isfinite(f.B).all() for f in adapter.values())
    assert any(f.B.abs().sum() > 0 for f in adapter.values())  # noise and updates arrived


@pytest.mark.parametrize("family", ["qwen2"])
def test_fedlpp_bundle_of_another_family(family, model_dir, tmp_path):
    config = load_config(None, [f"model.name={model_dir(family)}", *PRIVATE_ROUND,
                                "quantization.base=q8_0"])
    summary = run(config, tmp_path / "run")
    report = summary["model_privacy"]  # the clients trained on the q8_0 bundle of a Qwen2
    assert report["base_scheme"] == "q8_0" and report["client_base"] != report["server_base"]
    adapter = unflatten(last_checkpoint(tmp_path / "run").tensors)
    assert any(f.B.abs().sum() > 0 for f in adapter.values())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
@pytest.mark.parametrize(("family", "dtype"), WITH_NF4)
def test_per_example_grads_match_a_loop_over_examples(family, dtype, model_dir, checkpointing):
    """And with train.gradient_checkpointing: the recomputed forward changes no gradient, and
    the per-example hooks count each LoRA use once. On an NF4 base too: the LoRA factors see the
    4-bit layers' float32 outputs and inputs, like any other."""
    model = load_model(str(model_dir(family)), dtype, "cpu")
    handles = attach(model, spec_of(LoraSection(rank=4, alpha=8.0), model), seed=0)
    g = torch.Generator().manual_seed(5)
    randomize_lora_b(handles, g, 0.5)  # with B = 0 (PEFT's init) the gradient of A would be zero
    named = {f"{layer}.{suffix}": linear.weight
             for layer, pair in lora_linears(handles).items()
             for suffix, linear in zip(("lora_A", "lora_B"), pair)}
    set_trainable(handles, train_a=True)
    vocab = model.config.vocab_size
    examples = [Example(tuple(torch.randint(3, vocab, (n,), generator=g).tolist()),
                        tuple(torch.randint(3, vocab, (a,), generator=g).tolist()), None)
                for n, a in ((9, 2), (4, 3), (13, 1), (6, 2))]  # lengths differ: padding

    expected = {name: [] for name in named}
    for example in examples:  # brute force: one backward per example, unbatched
        for p in named.values():
            p.grad = None
        lm.per_example_loss(handles.model, collate([example], pad_id=2)).sum().backward()
        for name, p in named.items():
            expected[name].append(p.grad.detach().clone())
    expected = {name: torch.stack(grads) for name, grads in sorted(expected.items())}
    for p in named.values():
        p.grad = None

    for module in handles.model.modules():  # GPT-2's dropouts: the loop above ran in eval mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    handles.model.train(checkpointing)  # transformers checkpoints in training mode only
    with PerExampleGrads(handles, train_a=True) as tracker, \
            gradient_checkpointing(handles.model, checkpointing):
        lm.per_example_loss(handles.model, collate(examples, pad_id=2)).sum().backward()
        grads = tracker.collect()
    assert not causal_lm(handles.model).is_gradient_checkpointing  # switched off again
    assert list(grads) == list(expected)
    for name in expected:  # float32 sums in another order: the error scales with the values
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-5 * scale)
    assert all(torch.count_nonzero(grad) > 0 for grad in grads.values())

    clip = 0.5 * min(joint_l2_norm({k: v[b] for k, v in expected.items()})
                     for b in range(len(examples)))
    summed, _ = clip_per_example(grads, clip)
    for name, value in expected.items():
        norms = [joint_l2_norm({k: v[b] for k, v in expected.items()})
                 for b in range(len(examples))]
        reference = sum(value[b] * min(1.0, clip / norms[b]) for b in range(len(examples)))
        torch.testing.assert_close(summed[name], reference, rtol=1e-4,
                                   atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("family", NF4_FAMILIES)
def test_an_nf4_base_stores_its_layers_in_4_bits_and_lora_wraps_them(family, model_dir):
    import bitsandbytes as bnb

    name = str(model_dir(family))
    full, nf4 = load_model(name, "float32", "cpu"), load_model(name, "nf4", "cpu")
    assert weights_dtype(full) == "float32" and weights_dtype(nf4) == "nf4/float32"
    layers = [m for m in nf4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) >= 3 * LAYERS  # attention and MLP layers, every one of them
    assert all(layer.weight.dtype == torch.uint8 for layer in layers)  # packed codes
    assert all(layer.weight.quant_state.quant_type == "nf4" for layer in layers)
    assert not isinstance(nf4.get_output_embeddings(), bnb.nn.Linear4bit)  # the head: full
    # what full fine-tuning would move is the full model's size, not its 4-bit codes'
    assert full_finetune_bytes(nf4) == full_finetune_bytes(full)
    # and its size (train.gradient_checkpointing = "auto" reads it) is the full model's count
    assert parameter_count(nf4) == parameter_count(full) > sum(p.numel() for p in nf4.parameters())
    handles = attach(nf4, spec_of(LoraSection(rank=2), nf4), seed=0)
    wrapped = [m for m in handles.model.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == len(handles.layers) > 0
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped)
    # 4-bit weights change the logits, by about what NF4's error on random weights gives
    ids = torch.arange(3, 19)[None, :]
    with torch.no_grad():
        exact, coarse = full(input_ids=ids).logits, nf4(input_ids=ids).logits
    gap = float((exact - coarse).abs().max() / exact.abs().max())
    assert 0 < gap < 0.5, gap


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_nf4_computes_in_bf16_where_auto_would_and_a_private_round_runs(device, monkeypatch,
                                                                          tmp_path):
    """On a GPU or a CPU with native bf16 (here pretended), the 4-bit layers compute in bf16."""
    monkeypatch.setattr(models, "native_bf16", lambda *args: True)
    assert weights_dtype(load_model("tiny-random", "nf4", device)) == "nf4/bfloat16"
    overrides = [o for o in PRIVATE_ROUND if not o.startswith("model.")]
    config = load_config(None, ["model.name=tiny-random", "model.dtype=nf4",
                                f"model.device={device}", *overrides])
    summary = run(config, tmp_path / "run")
    assert summary["model_dtype"] == "nf4/bfloat16"
    assert 0 < summary["privacy"]["epsilon_spent_pld"] < math.inf
    adapter = unflatten(last_checkpoint(tmp_path / "run").tensors)
    assert all(torch.isfinite(f.B).all() for f in adapter.values())
    assert any(f.B.abs().sum() > 0 for f in adapter.values())


def test_on_an_nf4_base_checkpointing_drops_what_the_hooks_see():
    """The DP hooks keep no activation alive under checkpointing on 4-bit layers either (the
    float32 case: tests/privacy/test_per_example.py)."""
    model = load_model("tiny-random", "nf4", "cpu")
    handles = attach(model, spec_of(LoraSection(rank=2), model), seed=0)
    randomize_lora_b(handles, torch.Generator().manual_seed(3), 0.5)  # else A's gradient is 0
    set_trainable(handles, train_a=True)
    handles.model.train(True)  # transformers checkpoints in training mode only
    ids = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    width = model.config.hidden_size
    alive = {}
    for tracked in (False, True):
        with gradient_checkpointing(handles.model, True), \
                PerExampleGrads(handles) if tracked else contextlib.nullcontext() as tracker:
            loss = handles.model(input_ids=ids).logits.sum()
            alive[tracked] = live_activations(width)
            loss.backward()
            if tracked:
                assert all(torch.count_nonzero(g) > 0 for g in tracker.collect().values())
    assert alive[True] == alive[False] > 0


def test_nf4_refuses_fedlpp_and_a_missing_bitsandbytes(monkeypatch):
    with pytest.raises(ConfigError, match="model.dtype = 'nf4' and quantization.base = 'q4_0'"):
        load_config(None, ["model.dtype=nf4", "quantization.base=q4_0"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs bitsandbytes: pip install 'privlora\\[nf4\\]'"):
        load_model("tiny-random", "nf4", "cpu")


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_get_their_targets_and_our_forward_equals_theirs(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MORE_FAMILIES[family]).eval()
    assert model.config.model_type == family
    handles = attach(model, spec_of(LoraSection(), model), seed=0)
    assert {name.rsplit(".", 1)[-1] for name in handles.layers} == set(DEFAULT_TARGETS[family])
    with torch.no_grad():  # B != 0, so the LoRA path counts in the comparison
        for _, lora_b in lora_linears(handles).values():
            lora_b.weight.normal_()
    lm.check_answer_path(handles.model, family)  # raises where the two differ


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_a_family_with_an_unknown_step_after_its_head_is_refused(family, monkeypatch):
    model = AutoModelForCausalLM.from_config(MORE_FAMILIES[family]).eval()
    monkeypatch.setattr(lm, "finish_logits", lambda config, logits: logits)  # as if unknown
    with pytest.raises(ConfigError, match=f"'{family}'.*not supported"):
        lm.check_answer_path(model, f"some/{family}")


def test_every_listed_default_names_modules_its_family_has():
    """Each entry of the table, on its family's default architecture (1 layer, no weights)."""
    for family, targets in DEFAULT_TARGETS.items():
        config = AutoConfig.for_model(family)
        config.num_hidden_layers = 1  # after validation: GPT-Neo checks its per-layer list
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        assert set(targets) <= leaves, f"{family}: {targets} not in {sorted(leaves)}"
    assert default_targets("mpt") == ("Wqkv",)
    assert default_targets("no-such-family") == ()


@pytest.mark.parametrize("config, words", [
    (BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32), ["'bert'", "encoder (masked LM)"]),
    (T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
     ["'t5'", "encoder-decoder"]),
])
def test_a_model_that_is_not_a_decoder_only_causal_lm_is_refused(config, words, tmp_path):
    config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_model(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_family_with_no_known_default_must_name_its_targets(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "model_type", "no-such-family")
    with pytest.raises(ConfigError, match="no default for model_type 'no-such-family'.*q_proj"):
        spec_of(LoraSection(), tiny_model)
    assert spec_of(LoraSection(target_modules=("v_proj",)), tiny_model).target_modules == ("v_proj",)
