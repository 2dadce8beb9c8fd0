"""Privacy/utility tables: accuracy (and macro-F1) against epsilon, per task, mode and rule.

One command per table; each cell is one federated run through the product's own code, with the
plan's noise-to-signal call printed beside the measured outcome.

    .venv/bin/python bench/utility.py --task builtin                  # the default cells
    .venv/bin/python bench/utility.py --task sst2 --cells nodp,sample-8,sample-2
    .venv/bin/python bench/utility.py --task builtin --quick          # a smoke run (tiny budget)
    .venv/bin/python bench/utility.py --task builtin --report         # the table from the JSON
    .venv/bin/python bench/utility.py --task fpb --cells sample-8+auto --plan   # auto's choice
    .venv/bin/python bench/utility.py --task builtin-gpu              # the GPU recipe (CUDA)
    .venv/bin/python bench/utility.py --task builtin-gpu --quick --set model.device=cpu

``--set key=value`` (repeatable) changes every cell's config after the cell's own changes, e.g.
to smoke-test a GPU recipe on the CPU. Each row records the device it ran on.

Cells: ``zero`` is read from every run's zero-shot eval. ``central`` = one client, no DP;
``nodp`` = the federated recipe without DP; ``sample-E`` / ``client-E`` / ``local-E`` = that mode
at target epsilon E (delta 1e-5, secure noise). Suffixes ``+fedavg`` and ``+dirichlet`` switch
the rule and the partition, ``+label`` / ``+answer`` the training loss (``train.loss``),
``+sgd`` SGD with momentum 0.9 instead of Adam, ``+lrX`` the learning rate (``+sgd+lr0.3``).
``+auto`` replaces the task's recipe by what a new user would write (model, data, clients,
epsilon, the declared examples per client) with ``privacy.recipe = "auto"``: ``nodp+auto``,
``sample-8+auto``, ``sample-2+auto``; ``+budgetN`` after it is that user setting
``train.max_examples_processed = N`` (``sample-2+auto+budget16384``); ``nodp+auto+recipeE``
is the recipe auto chooses for ``sample-E+auto`` (adapter, batch, steps, lr, loss) trained
without clipping or noise: what DP itself costs, apart from the recipe it asks for; ``+rankN``
in a private ``+auto`` cell (or after ``+recipeE``) is the user setting ``lora.rank = N`` and
``lora.last_layers = 0``, auto choosing the rest (``sample-8+auto+rank4``: rank 4 on every
layer, more released coordinates than auto's rank 2); ``+KEY=VALUE`` in an ``+auto`` cell is
the user setting that config key, auto choosing the rest
(``nodp+auto+recipe8+federation.aggregation=fedavg+lora.last_layers=0``: auto's epsilon-8 recipe
with A trained on every layer, without noise; a value may not hold ``+``, and a comma
only inside a list's brackets).
Rows accumulate in bench/results/utility_<task>.json (a rerun of a cell with the same seed
replaces it); the Markdown table and a plot of accuracy against epsilon
(bench/results/utility_<task>.png) are remade from all rows each time.

Gain kept = (accuracy - floor) / (non-private accuracy - floor), floor = the larger of zero-shot
and the majority class: the share of what fine-tuning adds that survives DP. The non-private
accuracy is the ``nodp`` cell with the same suffixes when there is one (``nodp+label`` for
``sample-8+label``), else one with more (``nodp+auto+budget4096`` for ``sample-8+auto``), else
with fewer, else ``nodp`` (``+rankN`` and ``+KEY=VALUE`` are not counted: they are the user's
changes to one recipe, measured against that recipe's twin);
the table names it when it is not the cell's own. "Above floor" counts binomial standard errors
(each seed; the smallest shown), "below zero-shot" (generation) the paired standard errors of
the per-example differences (older rows: the two losses' errors combined); a "learns" call
agrees only above 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import statistics
from pathlib import Path

from _common import RESULTS, device_label, devices, pct, run_config, save, saved, summary_row, table

from privlora.evaluate import drop_error, floor_margin, margin

# The DP recipe per task is a config file (README, "Private training that learns"): many examples
# per step, few released coordinates (FFA, rank 2), Adam at a DP learning rate.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = {
    "builtin": CONFIGS / "demo.toml",
    "sst2": CONFIGS / "sst2.toml",
    "fpb": CONFIGS / "fpb.toml",
    "fiqa": CONFIGS / "fiqa.toml",
    "pubmedqa": CONFIGS / "pubmedqa.toml",
    "dolly": CONFIGS / "dolly.toml",  # generative: answer loss and perplexity
    # GPU recipes (model.device = "cuda"): what a GPU affords, far beyond the 2-core CPU's budget
    "builtin-gpu": CONFIGS / "builtin_gpu.toml",  # sample-level DP, batches of 1,024
    "builtin-clients-gpu": CONFIGS / "builtin_clients_gpu.toml",  # 1,000 clients, client DP
}
DEFAULT_CELLS = "nodp,sample-8,sample-2"
QUICK = ["model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=400",
         "data.max_eval=16", "federation.rounds=1", "train.local_steps=1", "train.batch_size=4",
         "lora.last_layers=1"]


SWITCHES = {"fedavg": ("federation.aggregation=fedavg",),
            "dirichlet": ("data.partition=dirichlet",),
            "label": ("train.loss=label",), "answer": ("train.loss=answer",),
            "sgd": ("train.optimizer=sgd", "train.momentum=0.9")}


def _switch(name: str) -> tuple[str, ...]:
    """The overrides of one ``+suffix`` of a cell: a name in SWITCHES, or lrX (train.lr = X)."""
    if name.startswith("lr"):
        return (f"train.lr={float(name[2:])}",)
    return SWITCHES[name]


def _number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _rank(switch: str) -> bool:
    """Whether an +auto cell's switch is +rankN: the user setting lora.rank = N on every layer
    (lora.last_layers = 0), auto choosing the rest: more released coordinates than auto's."""
    return switch.startswith("rank") and switch[4:].isdigit() and int(switch[4:]) > 0


def _key_value(switch: str) -> bool:
    """Whether an +auto cell's switch is +KEY=VALUE (``+federation.aggregation=fedavg``): the
    user set that config key, auto chose the rest."""
    return "=" in switch


def _recipe(switch: str) -> bool:
    """Whether a nodp+auto cell's switch is +recipeE: auto's recipe for epsilon E, trained
    without clipping or noise."""
    return switch.startswith("recipe") and _number(switch[6:])


def _user_set(switch: str) -> bool:
    """Whether a switch names the user's own choice in an +auto cell: +rankN or +KEY=VALUE."""
    return _rank(switch) or _key_value(switch)


def split_cells(text: str) -> list[str]:
    """The comma-separated cells of ``--cells``; a comma inside brackets belongs to a list value
    (``sample-8+auto+lora.target_modules=["q_proj","v_proj"]``)."""
    return re.split(r",(?![^\[]*\])", text)


def cell_config(task: str, cell: str, seed: int, quick: bool, extra: tuple[str, ...] = ()):
    """The RunConfig of one cell: the task's config file, the cell's changes, the seed, then
    the ``--set`` overrides ``extra``."""
    from privlora.config import load_config, validate, without_privacy

    name, *switches = cell.split("+")
    if "auto" in switches:
        budget = [f"train.max_examples_processed={s[6:]}" for s in switches
                  if s.startswith("budget") and s[6:].isdigit()]
        recipe = [s[6:] for s in switches if _recipe(s)]
        ranks = [s[4:] for s in switches if _rank(s)]
        keys = [s for s in switches if _key_value(s)]  # applied before --set
        if (len(switches) != 1 + len(budget) + len(recipe) + len(ranks) + len(keys)
                or len(budget) > 1
                or len(recipe) > 1 or len(ranks) > 1 or (recipe and name != "nodp")
                or (ranks and name == "nodp" and not recipe)):
            raise SystemExit(f"{cell}: +auto combines only with one +budgetN (N an integer), "
                             "one +rankN under DP, in a nodp cell one +recipeE (E an "
                             "epsilon), and +KEY=VALUE settings")
        users = [*([f"lora.rank={ranks[0]}", "lora.last_layers=0"] if ranks else []), *keys]
        if recipe:  # auto's sample-level recipe at epsilon E, run without clipping or noise
            from privlora.privacy.recipe import resolve

            private = auto_config(task, f"sample-{recipe[0]}", seed, quick,
                                  (*budget, *users, *extra))
            return without_privacy(resolve(private).config)
        return auto_config(task, name, seed, quick, (*budget, *users, *extra))
    overrides = [f"seed={seed}", *(QUICK if quick else [])]
    overrides += [o for s in switches for o in _switch(s)]
    if name == "central":
        overrides.append("federation.num_clients=1")
    overrides += extra
    config = load_config(RECIPE[task], overrides)
    if name in ("nodp", "central"):
        return without_privacy(config)
    mode, target = name.split("-")
    rate = config.privacy.sample_rate
    if quick and rate:  # the smoke run's batch of 4: the same share of the recipe's batch
        rate = min(1.0, rate * config.train.batch_size / load_config(RECIPE[task]).train.batch_size)
    privacy = dataclasses.replace(
        config.privacy, mode=mode, target_epsilon=float(target), noise_multiplier=None,
        sample_rate=rate if mode == "sample" else None)
    config = dataclasses.replace(config, privacy=privacy)
    validate(config)
    return config


def declared_examples_per_client(config) -> int:
    """What a user of ``config``'s data would declare per client: the training rows (the file's
    lines, less the held-out split when there is no eval file) over the clients, rounded down
    to two significant figures. The bench reads the row count as that user would; privlora
    itself never does (data.examples_per_client)."""
    from privlora.data import held_out_count

    d = config.data
    rows = _rows(d)
    if not d.eval_path:
        rows -= held_out_count(rows, d.eval_fraction, d.max_eval)
    per_client = rows // config.federation.num_clients
    scale = 10 ** max(0, len(str(per_client)) - 2)
    return per_client // scale * scale


def eval_size(config) -> int:
    """The number of examples ``config``'s runs are evaluated on: the held-out split, or the
    first ``data.max_eval`` of the eval file (privlora.data.split)."""
    from privlora.data import held_out_count

    d = config.data
    if d.eval_path:
        return min(d.max_eval, _lines(d.eval_path))
    return held_out_count(_rows(d), d.eval_fraction, d.max_eval)


def _rows(data) -> int:
    """The rows of ``data.path``: the generated built-in task's size, or the file's lines."""
    return data.builtin_examples if data.path == "builtin" else _lines(data.path)


@functools.cache
def _lines(path: str) -> int:
    """A JSONL file's non-empty lines, counted once per process (a table reads every row's)."""
    with open(path, encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def _margin(group: list[dict], floor: float) -> float | None:
    """The smallest floor margin over a cell's seeds (each seed's run must clear it); None for
    rows whose saved config no longer loads or whose data is not here."""
    from privlora.config import config_from_toml
    from privlora.errors import ConfigError

    margins = []
    for r in group:
        try:
            examples = eval_size(config_from_toml(r["config"]))
        except (ConfigError, OSError):
            return None
        margins.append(floor_margin(r["accuracy"], floor, examples))
    return min(margins)


def auto_config(task: str, name: str, seed: int, quick: bool, extra: tuple[str, ...] = ()):
    """An ``+auto`` cell: what a new user writes, the task's model, data and clients, the target
    epsilon and the declared examples per client, with ``privacy.recipe = "auto"`` choosing the
    rest (rank, modules, layers, rounds, steps, batch, lr, loss); evaluated at the start and
    the end only. ``extra`` (``--set``) comes last, as for every cell."""
    from privlora.config import flat_values, load_config, toml_value

    c = load_config(RECIPE[task], QUICK if quick else [])
    values = flat_values(c)
    kept = ["model.name", "model.dtype", "model.device", "federation.num_clients", *(
        k for k in values if k.startswith("data.") and k != "data.examples_per_client")]
    written = [f"{k}={toml_value(values[k])}" for k in kept if k in c.explicit]
    kind = "generation" if task == "dolly" else "classification"
    mode, _, target = ("none", "", "") if name == "nodp" else name.partition("-")
    overrides = [*written, *(QUICK if quick else []), f"seed={seed}", f"data.kind={kind!r}",
                 f"data.examples_per_client={declared_examples_per_client(c)}",
                 "federation.eval_every=1000", "privacy.recipe='auto'", f"privacy.mode={mode!r}",
                 *([f"privacy.target_epsilon={float(target)}",
                    f"privacy.delta={c.privacy.delta}"] if target else []), *extra]
    return load_config(None, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="builtin", choices=sorted(RECIPE))
    parser.add_argument("--cells", default=None, help="comma-separated; see the module docstring")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the table gives the "
                        "median and the min-max over them")
    parser.add_argument("--quick", action="store_true", help="tiny random model: a smoke run")
    parser.add_argument("--report", action="store_true", help="only print the table (only the --cells given, if any)")
    parser.add_argument("--plan", action="store_true", help="print each cell's resolved recipe "
                        "(privacy.recipe = 'auto' with its reasons) and run nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for every cell (repeatable)")
    parser.add_argument("--from-run", type=Path, default=None,
                        help="add a finished run directory as the one cell in --cells (its "
                        "config must be that cell's, data paths resolved) instead of running it")
    args = parser.parse_args()
    name = f"utility_{args.task}" + ("_quick" if args.quick else "")
    cells = split_cells(args.cells or DEFAULT_CELLS)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.plan:
        from privlora.privacy.recipe import resolve

        for cell in cells:
            for seed in seeds:
                recipe = resolve(cell_config(args.task, cell, seed, args.quick,
                                             tuple(args.overrides)))
                print(f"{cell} seed {seed}:", *(recipe.lines() or ["recipe: manual"]), sep="\n")
        return
    rows = saved(name, "rows", [])
    if not args.report:
        for seed in seeds:
            for cell in cells:
                out = RESULTS / "runs" / name / f"{cell}-seed{seed}"
                config = cell_config(args.task, cell, seed, args.quick, tuple(args.overrides))
                if args.from_run is not None:
                    result = imported(args.from_run, config)
                else:
                    result = run_config(config, out)
                row = {"task": args.task, "cell": cell, "seed": seed, **result,
                       "device": device_label(config.model.device, config.model.dtype)}
                # re-read first: another process may have added cells to the same table
                rows = saved(name, "rows", [])
                rows = [r for r in rows if (r["cell"], r["seed"]) != (cell, seed)] + [row]
                save(name, {"task": args.task, "rows": rows})
                print(f"{cell} seed {seed}: acc {pct(row['accuracy'])} in {row['seconds']} s",
                      flush=True)
    generation = bool(rows) and rows[0]["accuracy"] is None  # Dolly: answer loss, perplexity
    shown = split_cells(args.cells) if args.report and args.cells else None  # a table's subset
    print(render_generation(rows, shown) if generation else render(rows, shown))
    plot(rows, RESULTS / f"{name}.png", "loss" if generation else "accuracy")


def _cells(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        grouped.setdefault(r["cell"], []).append(r)
    return grouped


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return pct(known[0])
    return f"{pct(statistics.median(known))} ({pct(min(known))}-{pct(max(known))})"


def imported(run_dir: Path, config) -> dict:
    """The row of a finished run directory whose config is ``config`` (refused otherwise)."""
    import json

    from privlora.config import load_config, to_toml

    def resolved(c):
        data = dataclasses.replace(c.data, path=str(Path(c.data.path).resolve()),
                                   eval_path=str(Path(c.data.eval_path).resolve())
                                   if c.data.eval_path else "")
        return dataclasses.replace(c, data=data)

    from privlora.privacy.recipe import resolve

    ran = load_config(run_dir / "config.toml")
    if resolved(ran) != resolved(resolve(config).config):  # an +auto cell: what auto chose
        raise SystemExit(f"{run_dir}: its config.toml is not this cell's; run the cell instead")
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary_row(summary, to_toml(config), summary["wall_seconds"], run_dir)


def agrees(verdict: str, kept: float, margin: float | None = None) -> bool:
    """Whether the plan's call matches the outcome: 'learns' needs >= 50% of the gain kept and
    (where known) more than two standard errors above the floor, 'too noisy to learn' < 25%,
    'marginal' anything from 10% to 90%."""
    if verdict == "learns":
        return kept >= 0.5 and (margin is None or margin > 2)
    if verdict == "too noisy to learn":
        return kept < 0.25
    return 0.1 <= kept <= 0.9


def _twin(cell: str, grouped: dict[str, list[dict]]) -> str | None:
    """The non-private twin of a cell: "nodp" with the same switches (nodp+label for
    sample-8+label) when there is one; else one that adds switches after them (nodp+auto+budget4096
    for sample-8+auto: auto's non-private run at the private cells' default budget); else with
    the longest run of its first switches that has one (nodp+auto for
    sample-2+auto+budget16384); else "nodp". A noise-free recipe (nodp+auto+recipe8) is measured
    against the twin of the private cell it copies, a probe that changes it (+KEY=VALUE) against
    the recipe."""
    switches = [s for s in cell.split("+")[1:] if not _user_set(s)]  # only +auto cells have it
    own = "+".join(["nodp", *switches])
    recipe = [s for s in switches if _recipe(s)]
    if recipe:
        if own != cell and grouped.get(own):
            return own  # a probe (+KEY=VALUE, +rankN): against the recipe it changes
        # the noise-free recipe itself: against the non-private run it falls short of
        switches = [s for s in switches if s not in recipe]
        own = "+".join(["nodp", *switches])
    if grouped.get(own):
        return own
    longer = sorted(c for c in grouped if c.startswith(own + "+")
                    and not any(_recipe(s) for s in c.split("+")))
    if longer:
        return longer[0]
    for kept in range(len(switches) - 1, -1, -1):
        twin = "+".join(["nodp", *switches[:kept]])
        if grouped.get(twin):
            return twin
    return None


def _privacy_columns(group: list[dict], share: float | None,
                     margin: float | None = None) -> tuple[str, str, str]:
    """A cell's epsilon, sigma and the plan's call, with whether the outcome agrees."""
    from privlora.privacy.signal import verdict as call

    signal = group[0].get("noise_to_signal")
    # the call under today's thresholds: a row keeps the ratio it was run with
    verdict = None if signal is None else call(signal["whole_run"])
    call = "-" if signal is None else f"{signal['whole_run']:.3g} {verdict}"
    if verdict is not None and share is not None:
        call += "" if agrees(verdict, share, margin) else " (**disagrees**)"
    epsilon, sigma = group[0]["epsilon_pld"], group[0]["noise_multiplier"]
    return (f"{epsilon:.2f}" if isinstance(epsilon, float) else "inf",
            "-" if sigma is None else f"{sigma:.3f}", call)


def _kept(share: float | None, cell: str, twin: str | None) -> str:
    """The gain kept, naming the twin it is measured against when that is not the cell's own
    (``_twin``)."""
    if share is None:
        return "-"
    own = "+".join(["nodp", *cell.split("+")[1:]])
    return f"{100 * share:.0f}%" + ("" if twin in (own, cell) else f" (of {twin})")


def render(rows: list[dict], shown: list[str] | None = None) -> str:
    """The Markdown table: one line per cell, medians over seeds with min-max; "above floor" is
    the smallest over the seeds of (accuracy - floor) in standard errors (``floor_margin``)."""
    grouped = _cells(rows)
    floor = max(statistics.median(r["zero_shot_accuracy"] for r in rows),
                statistics.median(r["majority_accuracy"] for r in rows)) if rows else 0.0
    lines = []
    for cell, group in grouped.items():
        if shown is not None and cell not in shown:
            continue  # twins and the floor still come from every row
        twin = _twin(cell, grouped)
        top = statistics.median(r["accuracy"] for r in grouped[twin]) if twin else None
        acc = statistics.median(r["accuracy"] for r in group)
        share = None if top is None or top <= floor else (acc - floor) / (top - floor)
        margin = _margin(group, floor)
        epsilon, sigma, call = _privacy_columns(group, share, margin)
        lines.append([cell, len(group), epsilon, sigma,
                      _spread([r["accuracy"] for r in group]),
                      _spread([r.get("macro_f1") for r in group]),
                      "-" if margin is None else f"{margin:.1f}", _kept(share, cell, twin), call,
                      _seconds(group), devices(group)])
    header = (f"floor {pct(floor)} (max of zero-shot "
              f"{pct(statistics.median(r['zero_shot_accuracy'] for r in rows)) if rows else '-'} "
              f"and majority class)\n\n")
    return header + table(["cell", "seeds", "epsilon (PLD)", "sigma", "accuracy", "macro-F1",
                           "above floor (SE)", "gain kept", "noise-to-signal (plan's call)",
                           "seconds", "device"], lines)


def loss_margin(row: dict) -> float | None:
    """How many standard errors a generation run's answer loss lies below its zero-shot loss:
    over the paired error of the per-example differences where the run recorded it
    (summary.json's loss_drop), else over the two losses' errors combined, which makes the
    margin err low (``privlora.evaluate.drop_error``). None for rows recorded before either."""
    se = drop_error(row.get("loss_drop_se"), row.get("zero_shot_loss_se"), row.get("loss_se"))
    return None if se is None else margin(row["zero_shot_loss"] - row["loss"], se)


def render_generation(rows: list[dict], shown: list[str] | None = None) -> str:
    """The Markdown table of a generation task: answer loss and perplexity per cell; gain kept
    = (zero-shot loss - loss) / (zero-shot loss - the non-private twin's loss); "below
    zero-shot" is the smallest over the seeds of ``loss_margin``."""
    grouped = _cells(rows)
    lines = []
    for cell, group in grouped.items():
        if shown is not None and cell not in shown:
            continue  # twins and the floor still come from every row
        twin = _twin(cell, grouped)
        top = statistics.median(r["loss"] for r in grouped[twin]) if twin else None
        loss = statistics.median(r["loss"] for r in group)
        start = statistics.median(r["zero_shot_loss"] for r in group)  # its own eval set
        share = None if top is None or top >= start else (start - loss) / (start - top)
        margins = [loss_margin(r) for r in group]
        margin = None if None in margins else min(margins)
        epsilon, sigma, call = _privacy_columns(group, share, margin)
        lines.append([cell, len(group), epsilon, sigma, f"{loss:.3f}",
                      f"{statistics.median(r['perplexity'] for r in group):.2f}",
                      "-" if margin is None else f"{margin:.1f}",
                      _kept(share, cell, twin), call, _seconds(group),
                      devices(group)])
    start = statistics.median(r["zero_shot_loss"] for r in rows) if rows else math.nan
    header = (f"zero-shot answer loss {start:.3f} (perplexity {math.exp(start):.2f}; each cell's "
              "gain is measured from its own runs' zero-shot loss)\n\n")
    return header + table(["cell", "seeds", "epsilon (PLD)", "sigma", "answer loss",
                           "perplexity", "below zero-shot (SE)", "gain kept (loss)", "noise-to-signal (plan's call)",
                           "seconds", "device"], lines)


def _seconds(group: list[dict]) -> str:
    known = [r["seconds"] for r in group if r["seconds"] is not None]
    return f"{statistics.median(known):.0f}" if known else "-"


def plot(rows: list[dict], path: Path, metric: str = "accuracy") -> None:
    """``metric`` (accuracy, or a generation task's answer loss) against epsilon, one line per
    mode (non-private as a dashed level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    grouped = _cells(rows)
    for mode in ("sample", "client", "local"):
        points = sorted((float(c.split("-")[1].split("+")[0]),
                         statistics.median(r[metric] for r in g))
                        for c, g in grouped.items() if c.startswith(mode + "-") and "+" not in c)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{mode}-level DP")
    if "nodp" in grouped:
        ax.axhline(statistics.median(r[metric] for r in grouped["nodp"]), ls="--",
                   color="grey", label="no DP")
    if rows:
        ax.axhline(statistics.median(r[f"zero_shot_{metric}"] for r in rows), ls=":",
                   color="black", label="zero-shot")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("answer loss" if metric == "loss" else "accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
