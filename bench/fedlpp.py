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

from _common import DATA, RESULTS, pct, save, saved, table

GENERAL = DATA / "dolly15k" / "dolly15k.jsonl"
# Public text in the task's domain for transfer = "distill" (another public dataset)
PUBLIC = {"fpb": DATA / "fiqa_sentiment" / "fiqa_post_3class.jsonl"}
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


# How clients train on their quantized base and how the server serves the result: "grid"
# trains on the bundle's values and serves the adapter on the full-precision base; "bin" trains
# on a fresh draw within each weight's quantization bin every step (quantization.base_noise);
# "logits" trains as "grid" and serves the full-precision base's log-probabilities plus the
# adapter's change on the quantized base (quantization.transfer = "logits", proxy tuning), and
# also reports the adapter on the server's base (the "grid" number, from the same training);
# "distill" trains as "grid" and serves the adapter the server fits on its base to the clients'
# model on public text (quantization/correction.py; PUBLIC names the task's text).
METHODS = {"grid": [], "bin": ["quantization.base_noise=bin"],
           "logits": ["quantization.transfer=logits"], "distill": ["quantization.transfer=distill"]}


def default_rounds(task: str) -> int:
    """The task's default budget in rounds (``TASKS``)."""
    return next(int(o.split("=")[1]) for o in TASKS[task] if o.startswith("federation.rounds="))


def scheme_config(task: str, scheme: str, quick: bool, method: str = "grid", seed: int = 0,
                  rounds: int | None = None):
    from privlora.config import load_config

    budget = [] if rounds is None else [f"federation.rounds={rounds}",
                                        f"federation.eval_every={rounds}"]
    overrides = [*COMMON, *TASKS[task], *(QUICK if quick else []), f"seed={seed}", *budget]
    if scheme == "none":  # general text needs a quantized base: the unquantized run skips it
        overrides = [o for o in overrides if not o.startswith("quantization.")]
    else:
        overrides += [f"quantization.base={scheme}", *METHODS[method]]
        if method == "distill":
            if task not in PUBLIC:
                raise SystemExit(f"--methods distill needs public text for {task}: only {list(PUBLIC)}")
            overrides.append(f"quantization.public_text={str(PUBLIC[task])!r}")
    return load_config(None, overrides)


def run_scheme(task: str, scheme: str, quick: bool, out: Path, method: str = "grid",
               seed: int = 0, rounds: int | None = None) -> dict:
    import time

    from privlora.config import to_toml
    from privlora.simulation import run

    config = scheme_config(task, scheme, quick, method, seed, rounds)
    started = time.time()
    summary = run(config, out, overwrite=True)
    report = summary.get("model_privacy")
    from _common import provenance

    # rows accumulate over reruns: each keeps the commit it was measured at
    commit = provenance().get("commit")
    return {"task": task, "scheme": scheme, "method": method if scheme != "none" else "grid",
            "seed": seed, "rounds": config.federation.rounds, "commit": commit,
            "config": to_toml(config),
            "seconds": round(time.time() - started, 1), "run_dir": str(out),
            "zero_shot_accuracy": summary["zero_shot"]["accuracy"],
            "majority_accuracy": summary["majority_class_accuracy"],
            "accuracy": summary["final"]["accuracy"], "model_privacy": report}


def weight_error(scheme: str, quick: bool) -> dict:
    """How far what clients hold is from the server's weights: the relative Frobenius error of
    the decoder's linear layers and of the token embeddings, for the bundle's grid values and
    for the best estimate any coalition of clients can make from them (the midpoint of each
    weight's quantization bin, ``quantization/bins.py``: every client receives the same bundle,
    so pooling k of them adds nothing), with that estimate's general-text perplexity beside
    the server's base and the grid's. (The built-in model's own GGUF already stores the linear
    layers as Q4_1 and the embeddings as Q8_0, so re-quantizing to the same grid loses nothing.)
    """
    import tempfile

    import torch

    from privlora.data import GENERAL_TEXT, general_texts
    from privlora.evaluate import evaluate
    from privlora.models import TINY_RANDOM, load_model, load_tokenizer
    from privlora.quantization.bins import bins_of
    from privlora.quantization.bundle import load_bundle, model_weights, write_bundle

    name = TINY_RANDOM if quick else "builtin"
    dtype = "float32" if quick else "auto"
    model = load_model(name, dtype, "cpu")
    tokenizer = load_tokenizer(name)
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(model, tokenizer, scheme, f"{tmp}/b", name)
        bundle, manifest = load_bundle(f"{tmp}/b", dtype, "cpu")
    full, grid = model_weights(model), {n: w.clone() for n, w in model_weights(bundle).items()}
    midpoint = dict(grid)
    for entry in manifest.tensors:
        if entry.type != "F32" and not entry.identical:
            low, width = bins_of(grid[entry.name], entry.type)
            rows = grid[entry.name].float().reshape(low.shape[0], -1)
            midpoint[entry.name] = (rows + low + width / 2).reshape(entry.shape)

    def relative(held: dict, names: list[str]) -> float:
        num = sum(float((held[n].float() - full[n].float()).norm() ** 2) for n in names)
        return (num / sum(float(full[n].float().norm() ** 2) for n in names)) ** 0.5

    texts = general_texts(GENERAL, 4 if quick else 64, tokenizer, 128)

    def perplexity(weights: dict) -> float:
        with torch.no_grad():
            for n, w in model_weights(bundle).items():
                w.copy_(weights[n])
        return evaluate(bundle, texts, GENERAL_TEXT, tokenizer).perplexity

    linear = [n for n, w in full.items() if w.dim() == 2 and "embed" not in n]
    embed = ["model.embed_tokens.weight"]
    return {"linear": relative(grid, linear), "embeddings": relative(grid, embed),
            "midpoint_linear": relative(midpoint, linear),
            "midpoint_embeddings": relative(midpoint, embed),
            "general_perplexity_server": perplexity(full),
            "general_perplexity_grid": perplexity(grid),
            "general_perplexity_midpoint": perplexity(midpoint)}


def render(rows: list[dict]) -> str:
    unquantized = {(r["seed"], r["rounds"]): r for r in rows if r["scheme"] == "none"}
    lines = []
    for r in rows:
        m = r["model_privacy"]
        base = unquantized.get((r["seed"], r["rounds"]), unquantized.get((0, r["rounds"])))
        if m is None:
            lines.append([r["rounds"], r["scheme"], r["method"], r["seed"], _commit(r), "-", "-",
                          pct(r["accuracy"]), "-",
                          "-", "-", "-", "-", "-", "-"])
            continue
        error = r.get("weight_error") or {}
        # rows from before the manifest listed every file name the base and the weights' bytes
        # the old way (quantized_base; bundle_bytes = model.gguf only)
        alone = m.get("client_base", m.get("quantized_base"))
        weights = m.get("bundle_weights_bytes", m["bundle_bytes"])
        central, visible = m["central"], m["client_visible"]
        adapter = m.get("adapter_on_server_base")
        delta = "-" if base is None else f"{100 * (central['accuracy'] - base['accuracy']):+.1f}"
        lines.append([
            r["rounds"], r["scheme"], r["method"], r["seed"], _commit(r), f"{weights / 1e6:.1f} MB ({m['bundle_vs_full_precision']:.3f}x)",
            f"{error.get('linear', float('nan')):.3f} / {error.get('embeddings', float('nan')):.3f}",
            pct(central["accuracy"]), delta,
            "-" if adapter is None else pct(adapter["accuracy"]),
            pct(visible["accuracy"]), pct(alone["accuracy"]),
            f"{central['general_perplexity']:.2f}", f"{visible['general_perplexity']:.2f}",
            f"{m['general_perplexity_ratio']:.3f}"])
    zero = rows[0]["zero_shot_accuracy"] if rows else None
    return (f"zero-shot (full precision) {pct(zero)}, majority class "
            f"{pct(rows[0]['majority_accuracy']) if rows else '-'}\n\n") + table(
        ["rounds", "base scheme", "method", "seed", "commit", "bundle weights (vs float32)", "weight error linear / embeddings",
         "central acc", "central - unquantized (points)", "adapter on server base",
         "client-visible acc",
         "quantized base alone", "general ppl central", "general ppl client-visible",
         "ppl ratio"], lines) + _before_training(rows) + _reconstruction(rows)


def _commit(row: dict) -> str:
    """The commit a row was measured at (rows from before the column: "before 7980719")."""
    return row["commit"][:7] if row.get("commit") else "before 7980719"


def _reconstruction(rows: list[dict]) -> str:
    """Per scheme: what any coalition of clients holds (the same bundle, whatever k), its best
    estimate of the server's weights (the bins' midpoints) and that estimate's perplexity."""
    seen, lines = set(), []
    for r in rows:
        error = r.get("weight_error") or {}
        if r["scheme"] in seen or "midpoint_linear" not in error:
            continue
        seen.add(r["scheme"])
        lines.append([r["scheme"], f"{error['linear']:.3f} / {error['embeddings']:.3f}",
                      f"{error['midpoint_linear']:.3f} / {error['midpoint_embeddings']:.3f}",
                      f"{error['general_perplexity_server']:.2f}",
                      f"{error['general_perplexity_grid']:.2f}",
                      f"{error['general_perplexity_midpoint']:.2f}"])
    if not lines:
        return ""
    return "\n\nwhat k colluding clients can reconstruct (any k: every client gets the same " \
        "bundle)\n\n" + table(
            ["base scheme", "weight error of the grid (linear / embeddings)",
             "of the bins' midpoints", "general ppl server", "grid", "midpoints"], lines)


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


def _keyed(row: dict) -> dict:
    """A row with its method, seed and rounds (rows from before those columns: grid, seed 0,
    the task's default rounds)."""
    return {"method": "grid", "seed": 0, "rounds": default_rounds(row["task"]), **row}


def _key(row: dict) -> tuple[str, str, int, int]:
    return row["scheme"], row["method"], row["seed"], row["rounds"]


def _order(row: dict) -> tuple[int, int, int, int]:
    order, methods = DEFAULT_SCHEMES.split(","), list(METHODS)
    return (row["rounds"], order.index(row["scheme"]) if row["scheme"] in order else 99,
            methods.index(row["method"]) if row["method"] in methods else 99, row["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="builtin", choices=sorted(TASKS))
    parser.add_argument("--schemes", default=DEFAULT_SCHEMES)
    parser.add_argument("--methods", default="grid", help=f"of {sorted(METHODS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=None,
                        help="the budget in rounds (default: the task's, see TASKS); evaluated "
                             "at the end")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    name = f"fedlpp_{args.task}" + ("_quick" if args.quick else "")
    rows = [_keyed(r) for r in saved(name, "rows", [])]
    missing = [] if args.report else [r for r in rows if r["scheme"] != "none"
                                      and "midpoint_linear" not in r.get("weight_error", {})]
    for row in missing:  # rows measured before the column existed: the same bundle, recomputed
        row["weight_error"] = weight_error(row["scheme"], args.quick)
    if missing:
        save(name, {"task": args.task, "rows": rows})
    cells = [(scheme, method, int(seed)) for seed in args.seeds.split(",")
             for scheme in args.schemes.split(",")
             for method in (["grid"] if scheme == "none" else args.methods.split(","))]
    for scheme, method, seed in [] if args.report else cells:
        out = RESULTS / "runs" / name / f"{scheme}-{method}-{seed}-{args.rounds or 'default'}"
        row = run_scheme(args.task, scheme, args.quick, out, method, seed, args.rounds)
        if scheme != "none":
            row["weight_error"] = weight_error(scheme, args.quick)
        key = _key(row)
        rows = [r for r in map(_keyed, saved(name, "rows", [])) if _key(r) != key] + [row]
        rows.sort(key=_order)
        save(name, {"task": args.task, "rows": rows})
        print(f"{scheme} {method} seed {seed}: central {pct(row['accuracy'])} in "
              f"{row['seconds']} s", flush=True)
    print(render(rows))


if __name__ == "__main__":
    main()
