"""FedLPP: what a client holds (a quantized base) against what the server keeps (full precision).

One non-private federated run per quantization scheme of the base model, the same recipe and
seed for each; ``none`` is the unquantized run every scheme is compared with.

    .venv/bin/python bench/fedlpp.py --task builtin                      # the default schemes
    .venv/bin/python bench/fedlpp.py --task fpb --schemes none,q8_0,q4_0
    .venv/bin/python bench/fedlpp.py --task builtin --report             # the table from the JSON
    .venv/bin/python bench/fedlpp.py --task builtin --quick              # tiny random model

Per scheme: accuracy of the central model (full-precision base + the global adapter), the
client-visible model (the quantized base + the adapter as sent) and the quantized base alone;
the perplexity of general text the fine-tune never saw (the first 64 answers of
../shared/data/dolly15k) for the central and the client-visible model; the bundle's bytes; and
the central model's accuracy minus the unquantized run's. Rows accumulate in
bench/results/fedlpp_<task>.json (a rerun of a scheme replaces its row).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import RESULTS, pct, save, saved, table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GENERAL = DATA / "dolly15k" / "dolly15k.jsonl"
# Non-private, 4 IID clients, LoRA r=8 on q_proj and v_proj, FedAvg, AdamW 3e-3, batches of 8,
# evaluated at the start and after the last round on 200 held-out examples. The built-in task
# runs privlora's default budget (5 rounds x 12 local steps: 3 x 10 left it at 49%, still
# learning); Financial PhraseBank the job of bench/end_to_end.py (3 rounds x 10 steps).
COMMON = ["federation.num_clients=4", "train.batch_size=8", "train.lr=0.003",
          "data.max_eval=200", f"quantization.general_text={str(GENERAL)!r}",
          "quantization.general_examples=64"]
TASKS = {
    "builtin": ["data.builtin_examples=1200", "federation.rounds=5", "train.local_steps=12",
                "federation.eval_every=5"],
    "fpb": [f"data.path={str(DATA / 'financial_phrasebank' / 'fpb_sentences_allagree.jsonl')!r}",
            "federation.rounds=3", "train.local_steps=10", "federation.eval_every=3"],
}
DEFAULT_SCHEMES = "none,q8_0,q4_1,q4_0,nf4,tq2_0"
QUICK = ["model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=120",
         "data.max_eval=16", "federation.rounds=1", "train.local_steps=1",
         "federation.eval_every=1", "quantization.general_examples=4"]


def scheme_config(task: str, scheme: str, quick: bool):
    from privlora.config import load_config

    overrides = [*COMMON, *TASKS[task], *(QUICK if quick else [])]
    if scheme == "none":  # general text needs a quantized base: the unquantized run skips it
        overrides = [o for o in overrides if not o.startswith("quantization.")]
    else:
        overrides.append(f"quantization.base={scheme}")
    return load_config(None, overrides)


def run_scheme(task: str, scheme: str, quick: bool, out: Path) -> dict:
    import time

    from privlora.config import to_toml
    from privlora.server import run

    config = scheme_config(task, scheme, quick)
    started = time.time()
    summary = run(config, out, overwrite=True)
    report = summary.get("model_privacy")
    return {"task": task, "scheme": scheme, "config": to_toml(config),
            "seconds": round(time.time() - started, 1), "run_dir": str(out),
            "zero_shot_accuracy": summary["zero_shot"]["accuracy"],
            "majority_accuracy": summary["majority_class_accuracy"],
            "accuracy": summary["final"]["accuracy"], "model_privacy": report}


def weight_error(scheme: str, quick: bool) -> dict:
    """How far the bundle's weights are from the server's: relative Frobenius error of the
    decoder's linear layers and of the token embeddings (the built-in model's own GGUF already
    stores those as Q4_1 and Q8_0, so re-quantizing to the same grid loses nothing)."""
    import tempfile

    from privlora.models import TINY_RANDOM, load_model, load_tokenizer
    from privlora.quantization.bundle import load_bundle, model_weights, write_bundle

    name = TINY_RANDOM if quick else "builtin"
    model = load_model(name, "float32" if quick else "auto", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(model, load_tokenizer(name), scheme, f"{tmp}/b", name)
        bundle, _ = load_bundle(f"{tmp}/b", "float32" if quick else "auto", "cpu")
    full, quant = model_weights(model), model_weights(bundle)

    def relative(names: list[str]) -> float:
        num = sum(float((quant[n].float() - full[n].float()).norm() ** 2) for n in names)
        return (num / sum(float(full[n].float().norm() ** 2) for n in names)) ** 0.5

    linear = [n for n, w in full.items() if w.dim() == 2 and "embed" not in n]
    return {"linear": relative(linear), "embeddings": relative(["model.embed_tokens.weight"])}


def render(rows: list[dict]) -> str:
    base = next((r for r in rows if r["scheme"] == "none"), None)
    lines = []
    for r in rows:
        m = r["model_privacy"]
        if m is None:
            lines.append([r["scheme"], "-", "-", pct(r["accuracy"]), "-", "-", "-", "-", "-", "-"])
            continue
        error = r.get("weight_error") or {}
        # rows from before the manifest listed every file name the base and the weights' bytes
        # the old way (quantized_base; bundle_bytes = model.gguf only)
        alone = m.get("client_base", m.get("quantized_base"))
        weights = m.get("bundle_weights_bytes", m["bundle_bytes"])
        central, visible = m["central"], m["client_visible"]
        delta = "-" if base is None else f"{100 * (central['accuracy'] - base['accuracy']):+.1f}"
        lines.append([
            r["scheme"], f"{weights / 1e6:.1f} MB ({m['bundle_vs_full_precision']:.3f}x)",
            f"{error.get('linear', float('nan')):.3f} / {error.get('embeddings', float('nan')):.3f}",
            pct(central["accuracy"]), delta, pct(visible["accuracy"]), pct(alone["accuracy"]),
            f"{central['general_perplexity']:.2f}", f"{visible['general_perplexity']:.2f}",
            f"{m['general_perplexity_ratio']:.3f}"])
    zero = rows[0]["zero_shot_accuracy"] if rows else None
    return (f"zero-shot (full precision) {pct(zero)}, majority class "
            f"{pct(rows[0]['majority_accuracy']) if rows else '-'}\n\n") + table(
        ["base scheme", "bundle weights (vs float32)", "weight error linear / embeddings",
         "central acc", "central - unquantized (points)", "client-visible acc",
         "quantized base alone", "general ppl central", "general ppl client-visible",
         "ppl ratio"], lines) + _before_training(rows)


def _before_training(rows: list[dict]) -> str:
    """The general-text perplexity of the server's base and of each quantized base alone."""
    bases = [(r["scheme"], r["model_privacy"]) for r in rows if r["model_privacy"]]
    if not bases or bases[0][1]["central"]["general_perplexity"] is None:
        return ""
    # rows from before the summary renamed them: full_precision_base / quantized_base
    server = bases[0][1].get("server_base", bases[0][1].get("full_precision_base"))
    alone = [f"{scheme} {m.get('client_base', m.get('quantized_base'))['general_perplexity']:.2f}"
             for scheme, m in bases]
    return (f"\n\ngeneral-text perplexity before training: server's base "
            f"{server['general_perplexity']:.2f}; quantized base alone: " + ", ".join(alone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="builtin", choices=sorted(TASKS))
    parser.add_argument("--schemes", default=DEFAULT_SCHEMES)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    name = f"fedlpp_{args.task}" + ("_quick" if args.quick else "")
    rows = saved(name, "rows", [])
    missing = [r for r in rows if r["scheme"] != "none" and "weight_error" not in r]
    for row in missing:  # rows measured before the column existed: the same bundle, recomputed
        row["weight_error"] = weight_error(row["scheme"], args.quick)
    if missing:
        save(name, {"task": args.task, "rows": rows})
    if not args.report:
        for scheme in args.schemes.split(","):
            row = run_scheme(args.task, scheme, args.quick, RESULTS / "runs" / name / scheme)
            rows = saved(name, "rows", [])
            if scheme != "none":
                row["weight_error"] = weight_error(scheme, args.quick)
            rows = [r for r in rows if r["scheme"] != scheme] + [row]
            order = DEFAULT_SCHEMES.split(",")
            rows.sort(key=lambda r: order.index(r["scheme"]) if r["scheme"] in order else 99)
            save(name, {"task": args.task, "rows": rows})
            print(f"{scheme}: central {pct(row['accuracy'])} in {row['seconds']} s", flush=True)
    print(render(rows))


if __name__ == "__main__":
    main()
