"""Tokens/s of one local training step, privlora's against the common recipe, and the roofline.

In one process, on one machine: the bf16 and fp32 matmul peaks (GFLOPS), then, interleaved,
- privlora's own step (``client.gradient_step`` + AdamW; bf16 weights under autocast where the
  CPU has native bf16, answer-only logits), non-private and DP-SGD;
- the common recipe: the HF model in fp32 with PEFT LoRA on the same modules, ``model(...,
  labels=...)`` over the full vocabulary, ``loss.backward()``, AdamW.
Each on the same batch of SmolLM2 examples (LoRA r=8 on q_proj, v_proj). LoRA training costs
about 4 x the non-embedding parameters in FLOPs per token (2 forward, 2 for the input gradients
of the frozen weights), which sets the roofline percentage. Medians of --reps interleaved steps.
A profile (top ops by CPU time) of privlora's non-private step is saved with the result.
Usage: .venv/bin/python bench/throughput.py [--reps 6] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import save, table


def sync(device: torch.device) -> None:
    """Wait for the GPU (timings on CUDA are asynchronous otherwise)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, device: torch.device, reps: int = 10) -> float:
    """Median GFLOPS of an n x n x n matmul in ``dtype`` (the machine's practical peak)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def examples_of(tokenizer, batch: int, seq: int):
    """``batch`` built-in tickets lengthened and cut to ``seq`` tokens each."""
    import random

    from privlora import builtin_task
    from privlora.config import DataConfig
    from privlora.data import load_task, tokenize

    task = load_task(DataConfig(builtin_examples=max(40, batch)), seed=0)
    rows = [{"text": " ".join([r["text"]] + [builtin_task.ticket("billing", random.Random(i + k))
                                             for k in range(seq // 24)]), "label": r["label"]}
            for i, r in enumerate(task.rows[:batch])]
    return tokenize(rows, task, tokenizer, max_length=seq)


def privlora_step(handles, examples, pad_id, dp: bool):
    """One local step exactly as the product runs it."""
    from privlora.client import LocalSpec, gradient_step
    from privlora.lora import set_trainable, trained_parameters
    from privlora.privacy.client_dp import SampleDP

    sample_dp = SampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=1.0,
                         divisor=float(len(examples)), secure=True) if dp else None
    spec = LocalSpec(steps=1, batch_size=len(examples), lr=1e-4, sample_dp=sample_dp)
    optimizer = torch.optim.AdamW(set_trainable(handles, train_a=True), lr=spec.lr)
    named = trained_parameters(handles, train_a=True)
    rng = torch.Generator().manual_seed(0)

    def step() -> None:
        gradient_step(handles, examples, spec, named, rng, rng, pad_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def recipe_step(model, examples, pad_id, device):
    """One step as users write it today: HF forward with labels (full vocabulary), fp32, PEFT."""
    from privlora.data import collate

    batch = collate(examples, pad_id).to(device)
    labels = torch.full_like(batch.input_ids, -100)
    # HF shifts labels inside the loss: the label at t + 1 is what position t predicts
    labels[:, 1:][batch.target_mask[:, :-1]] = batch.targets[batch.target_mask]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def eval_seconds_per_example(handles, recipe_model, tokenizer, examples,
                             reps: int = 3) -> dict:
    """Seconds per example of privlora's ``evaluate`` (one forward, length-sorted, answer-only
    logits) and of the recipe's evaluation (full-vocabulary fp32 logits, label at the last
    prompt position), on the same examples."""
    from privlora.data import Task
    from privlora.evaluate import evaluate

    labels = tuple(sorted({e.label for e in examples}))
    task = Task("bench", "classification", "", labels, ())
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]

    def ours() -> None:
        evaluate(handles.model, examples, task, tokenizer)

    def theirs() -> None:
        with torch.no_grad():
            for start in range(0, len(examples), 32):
                chunk = examples[start : start + 32]
                width = max(len(e.prompt) for e in chunk)
                ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
                mask = torch.zeros_like(ids)
                for b, e in enumerate(chunk):
                    ids[b, : len(e.prompt)], mask[b, : len(e.prompt)] = torch.tensor(e.prompt), 1
                device = recipe_model.device
                logits = recipe_model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                last = torch.tensor([len(e.prompt) - 1 for e in chunk], device=device)
                rows = torch.arange(len(chunk), device=device)
                logits[rows, last].log_softmax(-1)[:, label_ids].argmax(1).cpu()

    out = {}
    for name, fn in (("privlora", ours), ("common recipe", theirs)):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()  # both end on a .cpu() / .item(), so the GPU has finished
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) / len(examples)
    return out


def top_ops(step, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from privlora.data import collate
    from privlora.lora import LoraSpec, attach
    from privlora.models import (
        load_model,
        load_tokenizer,
        local_source,
        native_bf16,
        resolve_device,
        train_dtype,
    )

    device = resolve_device(args.device)
    peaks = {"bf16": matmul_gflops(torch.bfloat16, device),
             "fp32": matmul_gflops(torch.float32, device)}
    tokenizer = load_tokenizer("builtin")
    examples = examples_of(tokenizer, args.batch, args.seq)
    pad = tokenizer.pad_token_id
    tokens = int(collate(examples, pad).attention_mask.sum())
    dtype = train_dtype("auto", device)
    ours = attach(load_model("builtin", dtype, device.type), LoraSpec(), seed=0)
    ours.model.train()
    # the common recipe loads the model as transformers does by default (fp32, SDPA attention)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(local_source("builtin")),
                            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                       task_type="CAUSAL_LM")).to(device)
    theirs.train()
    base = ours.model.get_base_model()
    non_embedding = sum(p.numel() for n, p in base.named_parameters()
                        if "lora_" not in n and p is not base.get_input_embeddings().weight)
    steps = {"privlora": privlora_step(ours, examples, pad, dp=False),
             "privlora DP-SGD": privlora_step(ours, examples, pad, dp=True),
             "common recipe (HF + PEFT, fp32, full vocab)": recipe_step(theirs, examples, pad,
                                                                         device)}
    for step in steps.values():  # warm-up: kernels for these shapes
        step()
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.reps):
        names = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    eval_cost = eval_seconds_per_example(ours, theirs, tokenizer,
                                         examples_of(tokenizer, 64, 96))
    flops_per_token = 4 * non_embedding
    rows, result = [], {}
    for name, ts in times.items():
        median = statistics.median(ts)
        per_s = tokens / median
        peak = peaks["fp32"] if name.startswith("common") else peaks[
            "bf16" if dtype == "bfloat16" else "fp32"]
        roofline = per_s * flops_per_token / (peak * 1e9)
        result[name] = {"seconds": ts, "median_s": median, "tokens_per_s": per_s,
                        "roofline_fraction": roofline}
        rows.append([name, f"{median:.3f}", f"{per_s:,.0f}", f"{100 * roofline:.1f}%"])
    recipe = result["common recipe (HF + PEFT, fp32, full vocab)"]["tokens_per_s"]
    speedup = result["privlora"]["tokens_per_s"] / recipe
    dp_ratio = result["privlora DP-SGD"]["median_s"] / result["privlora"]["median_s"]
    save("throughput", {
        "args": vars(args), "device": str(device), "gpu": torch.cuda.get_device_name(device)
        if device.type == "cuda" else None, "cpu_capability":
        torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
        "train_dtype": dtype, "matmul_gflops": peaks, "tokens_per_step": tokens,
        "non_embedding_params": non_embedding, "flops_per_token": flops_per_token,
        "steps": result, "speedup_vs_recipe": speedup, "dp_over_plain": dp_ratio,
        "eval_seconds_per_example": eval_cost,
        "profile_privlora": top_ops(steps["privlora"])})
    print(f"matmul peak: bf16 {peaks['bf16']:.0f} GFLOPS, fp32 {peaks['fp32']:.0f} GFLOPS; "
          f"privlora trains in {dtype}; {tokens} tokens per step")
    print(table(["step", "median s", "tokens/s", "% of its dtype's matmul peak"], rows))
    print(f"privlora / common recipe = {speedup:.2f}x; DP-SGD / non-private = {dp_ratio:.3f}")
    print(f"evaluation per example: privlora {1e3 * eval_cost['privlora']:.1f} ms, common recipe "
          f"{1e3 * eval_cost['common recipe']:.1f} ms")


if __name__ == "__main__":
    main()
