"""Memory and speed of one local step against model size, private (per-example clipping) or not.

For each size: a random Llama of a public model's shape (from its config numbers: nothing is
downloaded), LoRA rank 8 on q_proj and v_proj, and local steps of ``--batch`` examples of
``--tokens`` tokens through privlora's own client code (client.local_update), non-private or DP
(sample-level: per-example gradients, joint clipping, noise).

Memory: one step in a fresh process for each mode, its peak resident set (Linux: VmHWM, reset by
/proc/self/clear_refs after the model is built) above the weights'; later steps in a process
reuse what the first one allocated, so only a first step shows it. Time: both modes alternately
in a third process, a warm-up pair, then ``--repeats`` timed pairs, the order swapped each pair so
that a drift in the machine's speed falls on both; a mode's time is the median of its timed
steps, the DP/plain ratio the median of the pairs' own ratios.
``--checkpointing`` is train.gradient_checkpointing ("auto": on from models.CHECKPOINT_ABOVE
parameters, as in a run). A size whose process the kernel kills (out of memory) is recorded as
not fitting; ``--repeats 0`` measures memory only.

    .venv/bin/python bench/model_size.py                          # the default grid
    .venv/bin/python bench/model_size.py --sizes 135M --repeats 1   # a quick look
    .venv/bin/python bench/model_size.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save, saved, table

# Shapes of public models (their configs' numbers; the weights here are random)
SMOL = {"vocab_size": 49152, "tie_word_embeddings": True}
LLAMA3 = {"vocab_size": 128256, "num_key_value_heads": 8}
SHAPES = {
    "135M": {**SMOL, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3},  # SmolLM2-135M
    "360M": {**SMOL, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5},  # SmolLM2-360M
    "1.7B": {**SMOL, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32},  # SmolLM2-1.7B
    "1B": {**LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "tie_word_embeddings": True},  # Llama-3.2-1B
    "3B": {**LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "tie_word_embeddings": True},  # Llama-3.2-3B
    "8B": {**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "tie_word_embeddings": False},  # Llama-3.1-8B
}
# --dtype nf4 loads each shape from a directory, as a user would: random bf16 weights saved
# here once (8B: 16 GB of disk), quantized to 4 bits as they are read
SHAPES_DIR = Path(os.environ.get("PRIVLORA_SHAPES", Path(tempfile.gettempdir()) / "privlora-shapes"))
GB = 2**30
FITS_GB = 24  # the CPU machine the issue names (CI's: 24 GiB)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def step_order(pair: int) -> tuple[bool, bool]:
    """Which step of a pair runs first: the non-private one on even pairs, the DP one on odd."""
    return (False, True) if pair % 2 == 0 else (True, False)


def build(size: str, batch: int, tokens: int, dtype: str, checkpointing: str):
    """The random model of ``size`` with LoRA attached, ``batch`` random examples and a step
    function ``step(private)`` running one local step through the client's code."""
    import torch

    from privlora import client
    from privlora.architectures import parameter_count
    from privlora.config import LoraSection
    from privlora.data import Example
    from privlora.lora import attach, read_adapter, spec_of
    from privlora.models import NF4, load_model, torch_dtype, wants_checkpointing, weights_dtype
    from privlora.privacy.client_dp import SampleDP
    from privlora.privacy.mechanisms import seeded_generator

    if dtype == NF4:  # as a user loads it: from a directory, quantized as it is read
        model = load_model(str(shape_dir(size)), NF4, "cpu")
    else:
        model = random_model(size, torch_dtype(dtype))
    config = model.config
    model.requires_grad_(False)
    checkpointed = wants_checkpointing(checkpointing, model)
    handles = attach(model, spec_of(LoraSection(rank=8, target_modules=("q_proj", "v_proj")),
                                    model), seed=0)
    g = torch.Generator().manual_seed(1)
    examples = [Example(tuple(torch.randint(3, config.vocab_size, (tokens - 2,),
                                            generator=g).tolist()), (5, 2), None)
                for _ in range(batch)]
    dp = SampleDP(clip=1.0, noise_multiplier=1.0, sample_rate=1.0, divisor=batch, secure=False)
    specs = {private: client.LocalSpec(steps=1, batch_size=batch, lr=1e-3, train_a=True,
                                       sample_dp=dp if private else None, microbatch=batch,
                                       send_counts=not private,
                                       gradient_checkpointing="on" if checkpointed else "off")
             for private in (False, True)}

    def step(private: bool) -> float:
        started = time.perf_counter()
        client.local_update(handles, read_adapter(handles), examples, specs[private],
                            seeded_generator(0, "b"), seeded_generator(0, "n"), pad_id=2)
        return time.perf_counter() - started

    info = {"size": size, "parameters": parameter_count(model),
            "checkpointing": checkpointed, "checkpointing_setting": checkpointing,
            "batch": batch, "tokens": tokens, "dtype": weights_dtype(model),
            "threads": torch.get_num_threads()}
    return info, step


def shape_dir(size: str) -> Path:
    """Where ``--save-shape`` left the random model of ``size`` (bf16 safetensors) for NF4 runs."""
    return SHAPES_DIR / size


def random_model(size: str, dtype):
    """A Llama of ``size``'s shape with random weights, built in ``dtype`` (a torch dtype): no
    float32 copy first. The default dtype is float32 again afterwards (LoRA factors are float32,
    as in a run)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **SHAPES[size]))
    finally:
        torch.set_default_dtype(torch.float32)


def save_shape(size: str) -> None:
    """Save a random model of ``size`` in bf16 as an HF directory (once: kept for later runs)."""
    import torch

    if not (shape_dir(size) / "config.json").is_file():
        random_model(size, torch.bfloat16).save_pretrained(shape_dir(size))


def step_memory(size: str, private: bool, batch: int, tokens: int, dtype: str,
                checkpointing: str) -> dict:
    """One step, the first in this process: its peak resident set above the weights'."""
    info, step = build(size, batch, tokens, dtype, checkpointing)
    weights = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the RSS
    step(private)
    peak = _rss("VmHWM")
    return {**info, "private": private, "weights_rss_gb": weights / GB,
            "step_peak_gb": (peak - weights) / GB, "process_peak_gb": peak / GB}


def step_times(size: str, batch: int, tokens: int, dtype: str, checkpointing: str,
               repeats: int) -> dict[str, list[float]]:
    """Non-private and DP steps alternately in this process: a warm-up pair, then ``repeats``
    timed pairs; the seconds of every step, warm-up first."""
    _, step = build(size, batch, tokens, dtype, checkpointing)
    seconds: dict[str, list[float]] = {"plain": [], "dp": []}
    for pair in range(repeats + 1):
        for private in step_order(pair):
            seconds["dp" if private else "plain"].append(step(private))
    return seconds


def timed(row: dict) -> bool:
    """Whether the row's time is a median of warm steps (rows carried over from bench/memory.py
    timed one cold step beside other jobs, so their time is not shown)."""
    return row.get("repeats", 0) > 0


def row_key(row: dict) -> tuple:
    """What a new measurement replaces: the same size, mode, batch, tokens, dtype and setting."""
    return (row["size"], row["private"], row["batch"], row["tokens"], row["dtype"],
            row["checkpointing_setting"])


def pair_ratio(dp: list[float], plain: list[float]) -> float:
    """The median over the timed pairs of DP seconds / non-private seconds (the first pair
    warmed up): each pair ran back to back, so a slower or busier machine slows both."""
    return statistics.median(d / p for d, p in zip(dp[1:], plain[1:], strict=True))


def ratios(rows: list[dict]) -> list[dict]:
    """DP against non-private for each measured (size, batch, tokens, dtype, checkpointing):
    the process's peak memory, the step's own memory and the step time (``pair_ratio``)."""
    out = []
    for dp in (r for r in rows if r["private"] and "error" not in r):
        key = {k: dp[k] for k in ("size", "batch", "tokens", "dtype", "checkpointing")}
        plain = next((r for r in rows if not r["private"] and "error" not in r
                      and all(r[k] == v for k, v in key.items())), None)
        if plain is not None:
            out.append({**key, "process_peak": dp["process_peak_gb"] / plain["process_peak_gb"],
                        "step_memory": dp["step_peak_gb"] / plain["step_peak_gb"],
                        "time": pair_ratio(dp["seconds_each"], plain["seconds_each"])
                        if timed(dp) and timed(plain) else None})
    return out


def largest_fitting(rows: list[dict], private: bool, memory_gb: float) -> str:
    """The largest measured size whose process peak stayed within ``memory_gb``, or "none"."""
    fitting = [r for r in rows if r["private"] == private and "error" not in r
               and r["process_peak_gb"] <= memory_gb]
    return max(fitting, key=lambda r: r["parameters"])["size"] if fitting else "none"


def render(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (-r["batch"], r["dtype"], r.get("parameters", 0),
                                       str(r.get("checkpointing")), r["private"]))
    measured = [r for r in rows if "error" not in r]
    lines = [[r["size"], f"{r['parameters'] / 1e6:,.0f}M", "yes" if r["private"] else "no",
              "on" if r["checkpointing"] else "off", f"{r['batch']} x {r['tokens']}", r["dtype"],
              f"{r['weights_rss_gb']:.2f}", f"{r['step_peak_gb']:.2f}",
              f"{r['process_peak_gb']:.2f}", f"{r['seconds']:.1f}" if timed(r) else "-",
              f"{r['tokens_per_s']:.0f}" if timed(r) else "-"] for r in measured]
    text = table(["model shape", "parameters", "DP", "checkpointing", "batch x tokens", "dtype",
                  "weights RSS (GB)", "step adds (GB)", "process peak (GB)", "step (s)",
                  "tokens/s"], lines)
    text += "\n\n" + table(
        ["model shape", "batch x tokens", "dtype", "checkpointing", "DP/plain process peak",
         "DP/plain step memory", "DP/plain step time"],
        [[q["size"], f"{q['batch']} x {q['tokens']}", q["dtype"],
          "on" if q["checkpointing"] else "off", f"{q['process_peak']:.2f}",
          f"{q['step_memory']:.2f}", "-" if q["time"] is None else f"{q['time']:.2f}"]
         for q in ratios(rows)])
    for dtype in sorted({r["dtype"] for r in measured}):
        of = [r for r in rows if r["dtype"] == dtype]
        text += (f"\n\nLargest measured shape whose process peak fits {FITS_GB} GB, {dtype}: "
                 f"no DP {largest_fitting(of, False, FITS_GB)}, "
                 f"DP {largest_fitting(of, True, FITS_GB)}")
    failed = [r for r in rows if "error" in r]
    if failed:
        text += "\n\n" + "\n".join(f"{r['size']} ({r['dtype']}, {r['batch']} x {r['tokens']}): "
                                   f"{r['error']}" for r in failed)
    return text


def child(arguments: list[str]) -> dict | str:
    """Run this script on ``arguments`` in a fresh process; its JSON, or why it gave none (a
    process the kernel killed did not fit in memory; any other failure stops the benchmark)."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                         check=False)
    if out.returncode == -9:
        return f"killed after {time.perf_counter() - started:.0f} s (out of memory)"
    if out.returncode != 0:
        sys.exit(f"{' '.join(arguments)}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135M,360M,1B,3B,8B", help=", ".join(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16",
                        help='"auto" as model.dtype resolves it; "nf4": a 4-bit base, as model.dtype')
    parser.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs after the warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--size", help=argparse.SUPPRESS)  # internal: a child's size
    parser.add_argument("--memory", choices=("plain", "dp"), help=argparse.SUPPRESS)
    parser.add_argument("--save-shape", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_shape:  # a child process: the random model of --size, saved for NF4 runs
        save_shape(args.size)
        print(json.dumps({"saved": str(shape_dir(args.size))}))
        return
    if args.size:  # a child process: one measurement, printed as JSON
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        if args.memory:
            result = step_memory(args.size, args.memory == "dp", args.batch, args.tokens,
                                 args.dtype, args.checkpointing)
        else:
            result = step_times(args.size, args.batch, args.tokens, args.dtype,
                                args.checkpointing, args.repeats)
        print(json.dumps(result))
        return
    rows = saved("model_size", "rows", [])
    if args.report:
        print(render(rows))
        return
    import torch

    from privlora.models import NF4, train_dtype

    dtype = train_dtype(args.dtype, torch.device("cpu"))
    label = f"{NF4}/{train_dtype('auto', torch.device('cpu'))}" if dtype == NF4 else dtype
    for size in args.sizes.split(","):
        started = time.perf_counter()
        if dtype == NF4:  # in its own process, so that building it counts in no measurement
            made = child(["--size", size, "--save-shape"])
            if isinstance(made, str):
                sys.exit(f"{size}: saving its random weights failed: {made}")
        common = ["--batch", str(args.batch), "--tokens", str(args.tokens), "--dtype", dtype,
                  "--checkpointing", args.checkpointing, "--repeats", str(args.repeats),
                  "--threads", str(args.threads)]
        new = []
        for private in (False, True):  # memory: one step, each in a fresh process
            out = child(["--size", size, "--memory", "dp" if private else "plain", *common])
            new.append(out if isinstance(out, dict) else
                       {"size": size, "private": private, "batch": args.batch,
                        "tokens": args.tokens, "dtype": label,
                        "checkpointing_setting": args.checkpointing, "error": out})
        if args.repeats and all("error" not in r for r in new):
            seconds = child(["--size", size, *common])
            if isinstance(seconds, str):
                sys.exit(f"{size}: the timing process failed after the memory ones passed: "
                         f"{seconds}")
            for r in new:
                each = seconds["dp" if r["private"] else "plain"]
                median = statistics.median(each[1:])  # the first pair warmed up
                r.update(seconds=median, seconds_each=each, repeats=args.repeats,
                         tokens_per_s=args.batch * args.tokens / median)
        keys = {row_key(r) for r in new}
        rows = [r for r in rows if row_key(r) not in keys] + new
        save("model_size", {"rows": rows})
        print(f"{size}: done in {time.perf_counter() - started:.0f} s", flush=True)
    print(render(rows))


if __name__ == "__main__":
    main()
