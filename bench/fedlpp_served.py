"""FedLPP: what each way of serving the clients' adapter scores on the server's base, on saved
runs of bench/fedlpp.py, on the run's held-out split and on a larger set nobody trained on.

    .venv/bin/python bench/fedlpp.py --task fpb --schemes none,nf4 --methods logits \\
        --rounds 10 --seeds 0,1,2                                 # the runs (saved adapters)
    .venv/bin/python bench/fedlpp_served.py --scheme nf4 --rounds 10 --seeds 0,1,2
    .venv/bin/python bench/fedlpp_served.py --report

Financial PhraseBank only. Per seed, from the quantized run's final global adapter: the adapter
on the server's full-precision base (``transfer = "adapter"``), the clients' model (their
quantized base + the adapter) and the adapter the server distils from the clients' model on
public text (``transfer = "distill"``, ``quantization/correction.py``: FiQA's 675 public
financial posts, another dataset); beside them the unquantized run's adapter on the same base.
Each is scored on the run's 200 held-out sentences and on the 1,189 sentences of FPB's
75%-agreement file that are not in the all-agree file the runs split (no run saw them; the
annotators agreed less on them): 1,389 together, a standard error of an accuracy near 1 point
where 200 give 1.5. The served models' general-text perplexity (the first 64 Dolly answers) gives the
hiding ratio. Rows go to bench/results/fedlpp_served_fpb.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from _common import DATA, RESULTS, fpb_unseen_rows, pct, provenance, save, saved, table

PUBLIC = DATA / "fiqa_sentiment" / "fiqa_post_3class.jsonl"
RUNS = RESULTS / "runs" / "fedlpp_fpb"
MODELS = ("unquantized", "adapter", "client_visible", "distill")


def measure(scheme: str, rounds: int, seed: int) -> dict:
    from safetensors.torch import load_file

    from privlora import data
    from privlora.config import load_config
    from privlora.evaluate import evaluate
    from privlora.lora import unflatten, write_adapter
    from privlora.rounds import _served_adapter, _visible
    from privlora.server import load_rows, prepare_server

    run = RUNS / f"{scheme}-logits-{seed}-{rounds}"
    reference = RUNS / f"none-grid-{seed}-{rounds}"
    config = load_config(run / "config.toml")
    q = dataclasses.replace(config.quantization, transfer="distill", public_text=str(PUBLIC))
    config = dataclasses.replace(config, quantization=q)
    task, _, eval_rows = load_rows(config)
    state = prepare_server(config, task, eval_rows, None)
    extra = data.tokenize(fpb_unseen_rows(), task, state.tokenizer, config.data.max_length)

    def adapter_of(path: Path):
        return unflatten(load_file(str(path / "checkpoints" / f"round_{rounds:03d}"
                                       / "adapter.safetensors")))

    def scored(handles, adapter) -> dict:
        write_adapter(handles, adapter)
        held = evaluate(handles.model, state.server.eval_examples, task, state.tokenizer)
        more = evaluate(handles.model, extra, task, state.tokenizer)
        both = (held.accuracy * held.examples + more.accuracy * more.examples) / \
            (held.examples + more.examples)
        return {"held_out": held.accuracy, "extra": more.accuracy, "combined": both,
                "examples": held.examples + more.examples}

    def perplexity(handles, adapter) -> float:
        write_adapter(handles, adapter)
        return evaluate(handles.model, state.server.general, data.GENERAL_TEXT,
                        state.tokenizer).perplexity

    started = time.time()
    glob = adapter_of(run)
    served = _served_adapter(state, glob, rounds)
    visible = _visible(state, glob)
    row = {"task": "fpb", "scheme": scheme, "seed": seed, "rounds": rounds,
           "commit": provenance().get("commit"), "run_dir": str(run),
           "public_text": str(PUBLIC), "distill_steps": q.distill_steps,
           "general_perplexity": {"distill": perplexity(state.central, served),
                                  "adapter": perplexity(state.central, glob),
                                  "client_visible": perplexity(state.handles, visible)},
           "unquantized": scored(state.central, adapter_of(reference)),
           "adapter": scored(state.central, glob),
           "client_visible": scored(state.handles, visible),
           "distill": scored(state.central, served)}
    row["seconds"] = round(time.time() - started, 1)
    return row


def render(rows: list[dict]) -> str:
    lines = []
    for r in sorted(rows, key=lambda r: (r["scheme"], r["seed"])):
        ppl = r["general_perplexity"]
        lines.append([f"{r['scheme']}, {r['seed']}, {r['rounds']}",
                      *(f"{pct(r[m]['held_out'])} / {pct(r[m]['combined'])}" for m in MODELS),
                      (f"{ppl['client_visible'] / ppl['adapter']:.2f}x / "
                       f"{ppl['client_visible'] / ppl['distill']:.2f}x")])
    return table(["scheme, seed, rounds", *(f"{m}: 200 / 1,389" for m in MODELS),
                  "client ppl / served: adapter / distill"], lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="nf4")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--report", action="store_true", help="only print the table")
    args = parser.parse_args()
    rows = saved("fedlpp_served_fpb", "rows", [])
    if not args.report:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = measure(args.scheme, args.rounds, seed)
            rows = [r for r in rows if (r["scheme"], r["seed"], r["rounds"])
                    != (row["scheme"], row["seed"], row["rounds"])] + [row]
            save("fedlpp_served_fpb", {"rows": rows})
    print(render(rows))


if __name__ == "__main__":
    main()
