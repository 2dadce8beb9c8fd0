"""Screen DP recipes for the built-in task: one `privlora run` per variant, side by side.

Each variant is the demo's config as it was screened (`configs/demo.toml` with `SCREENED`:
q_proj + v_proj, 40,000 tickets, 4 x 14 steps, Adam 1e-2; sample-level DP at epsilon 8) or the
1,000-client config (`configs/builtin_clients_gpu.toml`) with a few `--set` overrides. The runs
go in parallel (`--jobs`), each is cut at `--timeout` seconds (a cut run keeps the rounds it
evaluated), and the table lists every evaluated round's accuracy and the epsilon spent.

    python bench/recipe_sweep.py --device cuda --only D0,E4,E6 --jobs 3
    python bench/recipe_sweep.py --report

Results go to bench/results/recipe_sweep_<device>.json (merged with earlier variants there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import save, saved, table

ROOT = Path(__file__).resolve().parent.parent
DEMO = "configs/demo.toml"
CLIENTS = "configs/builtin_clients_gpu.toml"
# the demo's recipe when the sweep ran (commit 829ca75), before its result changed configs/demo.toml
SCREENED = ('lora.target_modules=["q_proj", "v_proj"]', "data.builtin_examples=40000",
            "train.local_steps=14", "train.lr=0.01", "privacy.sample_rate=0.0018",
            "federation.eval_every=1")
L8_128 = ("lora.last_layers=8", "train.batch_size=128", "privacy.sample_rate=0.00643")
L8_72 = ("lora.last_layers=8", "train.batch_size=72", "privacy.sample_rate=0.0036")
V_ONLY = ('lora.target_modules=["v_proj"]',)
CLIENTS_3 = ("federation.rounds=24", "train.local_steps=3", "privacy.clip=3.0",
             "federation.eval_every=4")

# name -> (config, overrides, no_privacy)
VARIANTS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "D0": (DEMO, (), False),
    "D1": (DEMO, L8_72, False),
    "D2": (DEMO, L8_128 + ("train.local_steps=10",), False),
    "D3": (DEMO, L8_128 + ("train.local_steps=10", "train.lr=0.02"), False),
    "D4": (DEMO, L8_72 + V_ONLY, False),
    "D5": (DEMO, V_ONLY, False),
    "E1": (DEMO, L8_128 + ("train.local_steps=10", "train.lr=0.03"), False),
    "E2": (DEMO, L8_128 + ("train.local_steps=10", "train.lr=0.05"), False),
    "E3": (DEMO, ("train.lr=0.02",), False),
    "E4": (DEMO, V_ONLY + ("train.lr=0.02",), False),
    "E5": (DEMO, L8_72 + ("train.lr=0.03",), False),
    "E6": (DEMO, L8_128 + ("train.lr=0.03",), False),
    "E7": (DEMO, ("lora.last_layers=12", "train.batch_size=96", "privacy.sample_rate=0.00482",
                  "train.local_steps=10", "train.lr=0.03"), False),
    "E8": (DEMO, L8_128 + ("train.local_steps=10", "train.lr=0.03",
                           "privacy.target_epsilon=2.0"), False),
    # the two CPU screens (one core each, side by side): E4 and its 3e-2 twin, every 2nd round
    "E4c": (DEMO, V_ONLY + ("train.lr=0.02", "federation.eval_every=2"), False),
    "E9c": (DEMO, V_ONLY + ("train.lr=0.03", "federation.eval_every=2"), False),
    # the label-only loss (train.loss = "label") on E4c, the demo's recipe before it
    "F1c": (DEMO, V_ONLY + ("train.lr=0.02", "federation.eval_every=2", "train.loss=label"),
            False),
    "C3": (CLIENTS, CLIENTS_3, False),
    "C3n": (CLIENTS, CLIENTS_3, True),
}


def command(name: str, device: str, out: Path) -> list[str]:
    """The `privlora run` command line of one variant."""
    config, overrides, no_privacy = VARIANTS[name]
    base = SCREENED if config == DEMO else ()
    sets = [a for o in base + overrides + (f"model.device={device}",) for a in ("--set", o)]
    return ([sys.executable, "-m", "privlora", "run", "--config", config, "--overwrite",
             "--out", str(out)] + sets + (["--no-privacy"] if no_privacy else []))


def run_variant(name: str, device: str, timeout: float, work: Path) -> dict:
    """Run one variant (cut at ``timeout`` s); return its evaluated rounds."""
    out = work / name
    cmd = command(name, device, out)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.monotonic()  # the whole run here (a private run's metrics carry no times)
    try:
        subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cut = False
    except subprocess.TimeoutExpired:
        cut = True
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    evaluated = [{"round": r["round"], "accuracy": r["accuracy"], "epsilon": r.get("epsilon")}
                 for r in rows if r.get("accuracy") is not None]
    return {"name": name, "command": " ".join(cmd[1:]).replace(str(out), "DIR"),
            "set": list(VARIANTS[name][1]), "no_privacy": VARIANTS[name][2],
            "rounds": evaluated, "cut": cut, "wall_s": round(time.monotonic() - started, 1)}


def render(runs: dict[str, dict]) -> str:
    rows = []
    for name, r in runs.items():
        last = r["rounds"][-1] if r["rounds"] else {"round": "-", "accuracy": None, "epsilon": None}
        curve = ", ".join(f"{100 * e['accuracy']:.1f}" for e in r["rounds"])
        eps = "inf" if r["no_privacy"] else (f"{last['epsilon']:.2f}" if last["epsilon"] else "-")
        rows.append([name, " ".join(r["set"]) + (" --no-privacy" if r["no_privacy"] else ""),
                     last["round"], eps, curve + (" (cut)" if r["cut"] else "")])
    return table(["variant", "overrides", "last round", "epsilon", "accuracy per evaluated round (%)"],
                 rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (model.device)")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--report", action="store_true", help="only reprint the saved table")
    args = parser.parse_args()
    name = f"recipe_sweep_{args.device}"
    runs = saved(name, "runs", {})
    if not args.report:
        chosen = [v for v in args.only.split(",") if v] or list(VARIANTS)
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        with tempfile.TemporaryDirectory(prefix="sweep-") as tmp, \
                ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda v: run_variant(v, args.device, args.timeout, Path(tmp)),
                                    chosen))
        runs.update({r["name"]: r for r in results})
        save(name, {"device": args.device, "runs": runs})
    print(render(runs))


if __name__ == "__main__":
    main()
