"""quantization.transfer = "distill": the server fits the adapter it serves on its
full-precision base to the clients' model (quantized base + global adapter) on public text."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from privlora import data
from privlora.errors import ConfigError, DataError
from privlora.evaluate import label_token_ids
from privlora.evaluate_adapter import evaluate_adapter
from privlora.lora import Factors, read_adapter, write_adapter
from privlora.quantization import correction
from privlora.rounds import _served_adapter
from privlora.simulation import prepare, run

PUBLIC = ["Quarterly profit rose sharply on strong demand.",
          "The company cut its forecast after sales fell.",
          "Shares were unchanged in early trading.",
          "The card was charged twice for one order.",
          "My package arrived late and damaged.",
          "Thanks, the refund came through quickly."]


@pytest.fixture()
def distill_config(tiny_config, tmp_path):
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in PUBLIC))

    def build(*overrides: str):
        return tiny_config("quantization.base=q4_0", "quantization.transfer=distill",
                           f"quantization.public_text={str(public)!r}",
                           "quantization.distill_steps=8", "quantization.distill_lr=0.01",
                           *overrides)

    return build


def _trained(adapter, seed: int = 0, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    return {k: Factors(A=f.A, B=torch.randn(f.B.shape, generator=g) * scale)
            for k, f in adapter.items()}


def _label_probs(sim, handles, adapter) -> torch.Tensor:
    """The label distribution of ``handles``' base + ``adapter`` on the public prompts, read
    without correction.py: each label's first-token probability, renormalised."""
    columns = [ids[0] for ids in label_token_ids(sim.server.task.labels, sim.tokenizer)]
    write_adapter(handles, adapter)
    batch = data.collate(sim.server.public, sim.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = handles.model(input_ids=batch.input_ids,
                               attention_mask=batch.attention_mask).logits
    last = batch.target_mask.float().argmax(dim=1)  # each prompt's first answer position
    probs = logits[torch.arange(len(last)), last].softmax(dim=-1)[:, columns]
    return probs / probs.sum(dim=1, keepdim=True)


def test_distilling_brings_the_server_model_to_the_clients_label_distribution(distill_config):
    sim = prepare(distill_config())
    clients = _trained(read_adapter(sim.handles), scale=5.0)  # strong label preferences
    teacher = _label_probs(sim, sim.handles, clients)
    columns = correction.label_columns(sim.server.task.labels, sim.tokenizer)
    pad = sim.tokenizer.pad_token_id
    write_adapter(sim.handles, clients)
    targets = correction.targets(sim.handles.model, sim.server.public, columns, pad)
    assert torch.allclose(targets.exp(), teacher, atol=1e-5)
    how = correction.Distillation(steps=30, lr=0.01, batch_size=4, columns=columns)
    start = sim.init  # B = 0: the server's base alone
    served = correction.distill(sim.central, start, sim.server.public, targets, how, pad,
                                torch.Generator().manual_seed(0))

    def kl(adapter) -> float:
        student = _label_probs(sim, sim.central, adapter)
        return float((teacher * (teacher.log() - student.log())).sum(dim=1).mean())

    before, after = kl(start), kl(served)
    assert after < 0.5 * before, (before, after)
    assert set(served) == set(start)
    assert not any(p.requires_grad for p in sim.central.model.parameters())


def test_the_correction_reads_no_client_data(distill_config):
    sim = prepare(distill_config())
    adapter = _trained(read_adapter(sim.handles), seed=3)
    first = _served_adapter(sim, adapter, 1)
    # other clients' data entirely: the served adapter cannot change
    sim.sites = [dataclasses.replace(site, examples=site.examples[::-1][: len(site.examples) // 2])
                 for site in sim.sites]
    sim.server.eval_examples.clear()
    again = _served_adapter(sim, adapter, 1)
    assert all(torch.equal(first[k].A, again[k].A) and torch.equal(first[k].B, again[k].B)
               for k in first)
    assert not all(torch.equal(first[k].B, adapter[k].B) for k in adapter)  # it did fit


def test_a_distill_run_serves_and_saves_the_fitted_adapter(distill_config, tmp_path):
    out = tmp_path / "run"
    summary = run(distill_config("federation.rounds=1"), out)
    report = summary["model_privacy"]
    assert report["transfer"] == "distill"
    assert report["central"]["accuracy"] == summary["final"]["accuracy"]
    assert set(report["adapter_on_server_base"]) == set(report["central"])
    assert report["adapter_on_server_base"]["loss"] != report["central"]["loss"]
    reloaded = evaluate_adapter(out / "adapter", None, None)  # stock PEFT, server's base
    assert reloaded["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


@pytest.mark.parametrize(("overrides", "named"), [
    (("quantization.base=q4_0", "quantization.transfer=distill"), "public_text"),
    (("quantization.base=q4_0", "quantization.public_text='p.jsonl'"), "does not read it"),
    (("quantization.transfer=distill", "quantization.public_text='p.jsonl'"), "quantized base"),
    (("quantization.base=q4_0", "quantization.transfer=distill",
      "quantization.public_text='p.jsonl'", "quantization.distill_steps=0"), "quantization.distill_steps"),
])
def test_distill_settings_that_cannot_work_are_named(tiny_config, overrides, named):
    with pytest.raises(ConfigError, match=named):
        tiny_config(*overrides)


def test_distill_refuses_a_generation_task_and_labels_sharing_a_first_token(tokenizer, tmp_path):
    public = tmp_path / "public.jsonl"
    public.write_text(json.dumps({"text": "some public text"}) + "\n")
    generation = data.Task("qa", "generation", "Answer.", (), ())
    with pytest.raises(ConfigError, match="classification"):
        data.public_prompts(public, 4, generation, tokenizer, 64)
    with pytest.raises(ConfigError, match="share one"):
        correction.label_columns(("very good", "very bad"), tokenizer)


def test_public_prompts_are_the_task_prompt_around_each_text(tokenizer, tmp_path):
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in PUBLIC))
    task = data.Task("t", "classification", "Label it.", ("good", "bad"), ())
    prompts = data.public_prompts(public, 3, task, tokenizer, 128)
    assert [p.prompt for p in prompts] == [
        tuple(data.render_prompt(task, t, tokenizer)) for t in PUBLIC[:3]]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(DataError, match="public text"):
        data.public_prompts(empty, 3, task, tokenizer, 128)
