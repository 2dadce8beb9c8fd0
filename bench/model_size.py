"""Memory of one local step against model size: DP (per-example clipping) or not, with and
without gradient checkpointing (train.gradient_checkpointing).

Each cell runs in its own process: a random Llama of a real model's shape (built from a config:
nothing is downloaded), LoRA rank 8 on q_proj and v_proj, one local step of ``--batch``
examples of ``--tokens`` tokens through privlora's own client code (client.local_update), in
``--dtype``. Memory is the process's peak resident set during the step minus its resident set
before it (Linux: /proc/self/clear_refs resets the peak): what the step adds to the weights.

    .venv/bin/python bench/memory.py                        # the default grid
    .venv/bin/python bench/memory.py --sizes 135M --batch 4   # a quick look
    .venv/bin/python bench/memory.py --report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import save, saved, table

# Shapes of public models (their configs' numbers; the weights here are random)
SHAPES = {
    "135M": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3},  # SmolLM2-135M
    "360M": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                 "num_attention_heads": 15, "num_key_value_heads": 5},  # SmolLM2-360M
    "1.7B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                 "num_attention_heads": 32, "num_key_value_heads": 32},  # SmolLM2-1.7B
}
VOCAB = 49152


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_cell(size: str, private: bool, checkpointing: bool, batch: int, tokens: int,
             dtype: str) -> dict:
    """Run one step in this process; return its memory and time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from privlora import client
    from privlora.config import LoraSection
    from privlora.data import Example
    from privlora.lora import attach, read_adapter, spec_of
    from privlora.privacy.client_dp import SampleDP
    from privlora.privacy.mechanisms import seeded_generator

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048,
                         tie_word_embeddings=True, **SHAPES[size])
    torch.set_default_dtype(getattr(torch, dtype))  # built in dtype: no float32 copy first
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)  # LoRA factors are float32, as in a run
    model.requires_grad_(False)
    parameters = sum(p.numel() for p in model.parameters())
    handles = attach(model, spec_of(LoraSection(rank=8, target_modules=("q_proj", "v_proj")),
                                    model), seed=0)
    g = torch.Generator().manual_seed(1)
    examples = [Example(tuple(torch.randint(3, VOCAB, (tokens - 2,), generator=g).tolist()),
                        (5, 2), None) for _ in range(batch)]
    dp = SampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=1.0, divisor=batch, secure=False)
    spec = client.LocalSpec(steps=1, batch_size=batch, lr=1e-3, train_a=True,
                            sample_dp=dp if private else None, microbatch=batch,
                            send_counts=not private,
                            gradient_checkpointing="on" if checkpointing else "off")
    before = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    client.local_update(handles, read_adapter(handles), examples, spec,
                        seeded_generator(0, "b"), seeded_generator(0, "n"), pad_id=2)
    seconds = time.perf_counter() - started
    return {"size": size, "parameters": parameters, "private": private,
            "checkpointing": checkpointing, "batch": batch, "tokens": tokens, "dtype": dtype,
            "weights_rss_gb": before / 2**30, "step_peak_gb": (_rss("VmHWM") - before) / 2**30,
            "seconds": seconds, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135M,360M,1.7B")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # size,private,checkpointing: internal
    args = parser.parse_args()
    if args.cell:
        size, private, checkpointing = args.cell.split(",")
        print(json.dumps(one_cell(size, private == "1", checkpointing == "1", args.batch,
                                  args.tokens, args.dtype)))
        return
    rows = saved("memory", "rows", [])
    if not args.report:
        for size in args.sizes.split(","):
            for private in (False, True):
                for checkpointing in (False, True):
                    out = subprocess.run(
                        [sys.executable, __file__, "--cell",
                         f"{size},{int(private)},{int(checkpointing)}", "--batch",
                         str(args.batch), "--tokens", str(args.tokens), "--dtype", args.dtype],
                        capture_output=True, text=True, check=True)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    key = (size, private, checkpointing, args.batch, args.tokens, args.dtype)
                    rows = [r for r in rows if (r["size"], r["private"], r["checkpointing"],
                                                r["batch"], r["tokens"], r["dtype"]) != key]
                    rows.append(row)
                    save("memory", {"rows": rows})
                    print(f"{size} private={private} checkpointing={checkpointing}: "
                          f"{row['step_peak_gb']:.2f} GB in {row['seconds']:.1f} s", flush=True)
    print(table(["model shape", "parameters", "DP", "checkpointing", "batch x tokens", "dtype",
                 "weights RSS (GB)", "step adds (GB)", "step (s)"],
                [[r["size"], f"{r['parameters'] / 1e6:.0f}M", "yes" if r["private"] else "no",
                  "on" if r["checkpointing"] else "off", f"{r['batch']} x {r['tokens']}",
                  r["dtype"], f"{r['weights_rss_gb']:.2f}", f"{r['step_peak_gb']:.2f}",
                  f"{r['seconds']:.1f}"] for r in rows]))


if __name__ == "__main__":
    main()
