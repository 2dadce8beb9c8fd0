"""The ``privlora`` command line: one function per subcommand, wiring only."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from privlora.errors import (
    BundleError,
    ConfigError,
    DataError,
    InvalidUpdate,
    PrivacyBudgetExceeded,
    RoundFailed,
)

# Why pretty_exceptions_show_locals=False: Typer's rich tracebacks print each frame's local
# variables by default, and those can hold a site's private rows.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Private federated LoRA fine-tuning of causal language models.")
privacy_app = typer.Typer(no_args_is_help=True, help="Epsilon, calibration and run plans.")
app.add_typer(privacy_app, name="privacy")
flower_app = typer.Typer(no_args_is_help=True,
                         help="Run on Flower's deployment engine (SuperLink + SuperNodes).")
app.add_typer(flower_app, name="flower")
site_app = typer.Typer(no_args_is_help=True, help="A site's own privacy ledger.")
app.add_typer(site_app, name="site")

_USER_ERRORS = (ConfigError, DataError, InvalidUpdate, PrivacyBudgetExceeded, BundleError,
                RoundFailed)


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=2)


# Options `privlora run` and `privlora flower local` share: the same run, on either runtime.
ConfigOption = Annotated[Path | None, typer.Option(help="Run config TOML file.")]
SetOption = Annotated[list[str], typer.Option("--set", help="Override: key=value (repeatable).")]
OutOption = Annotated[Path | None, typer.Option(help="Run directory (default runs/<time>).")]
DataOption = Annotated[str | None, typer.Option(help="Shortcut for --set data.path=PATH.")]
ModelOption = Annotated[str | None, typer.Option(help="Shortcut for --set model.name=...")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace a run already in --out.")]


@app.command()
def run(
    config: ConfigOption = None,
    set_: SetOption = [],  # noqa: B006
    out: OutOption = None,
    data: DataOption = None,
    model: ModelOption = None,
    overwrite: OverwriteOption = False,
    no_privacy: Annotated[bool, typer.Option(
        help="Drop the config's privacy section: the same run without DP, to compare.")] = False,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the stopped run in this directory from its last complete round, with "
             "its own config (--set may change only settings that touch no privacy).")] = None,
) -> None:
    """Run a federated LoRA fine-tune and write the run directory."""
    from privlora.run_dir import Stopped, stop_on_signals, stopped_line

    try:
        if resume is not None:
            _refuse_beside_resume(config, out, data, model, overwrite, no_privacy)
        cfg = (_run_config(resume / "config.toml", set_, None, None, False) if resume
               else _run_config(config, set_, data, model, no_privacy))
        out_dir = resume or out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        from privlora import simulation
        from privlora.progress import RichProgress

        with stop_on_signals(), RichProgress(cfg) as progress:
            summary = (simulation.resume(resume, set_, progress) if resume else
                       simulation.run(cfg, out_dir, progress, overwrite=overwrite))
    except _USER_ERRORS as err:
        _fail(err)
    except Stopped as stop:
        typer.echo(stopped_line(out_dir, cfg.federation.rounds, cfg.privacy.accountant), err=True)
        raise typer.Exit(code=stop.code) from None
    from privlora.progress import print_summary

    print_summary(summary, out_dir)


def _refuse_beside_resume(config: Path | None, out: Path | None, data: str | None,
                          model: str | None, overwrite: bool, no_privacy: bool) -> None:
    given = [name for name, value in (("--config", config), ("--out", out), ("--data", data),
                                      ("--model", model), ("--overwrite", overwrite),
                                      ("--no-privacy", no_privacy)) if value]
    if given:
        raise ConfigError(f"--resume continues a run with its own config and directory; drop "
                          f"{', '.join(given)}")


def _run_config(config: Path | None, set_: list[str], data: str | None, model: str | None,
                no_privacy: bool):
    """Load the config with the command line's overrides; warn about reproducible noise."""
    from privlora.config import load_config, without_privacy

    overrides = list(set_)
    if data:
        overrides.append(f"data.path={json.dumps(data)}")
    if model:
        overrides.append(f"model.name={json.dumps(model)}")
    cfg = load_config(config, overrides)
    if cfg.privacy.recipe == "auto":  # resolved once, here; --no-privacy keeps its values
        from privlora.privacy.recipe import resolve

        chosen = resolve(cfg)
        cfg = chosen.config
        typer.echo("\n".join(chosen.lines()), err=True)
    if no_privacy:
        cfg = without_privacy(cfg)
    if cfg.privacy.reproducible_noise:
        typer.echo("warning: privacy.reproducible_noise = true: DP noise is seeded from the run "
                   "seed, so the epsilon does not hold against anyone who knows or guesses it; "
                   "every published file says so", err=True)
    return cfg


@flower_app.command("local")
def flower_local(
    clients: Annotated[int, typer.Option(help="SuperNodes to start (federation.num_clients).")],
    config: ConfigOption = None,
    set_: SetOption = [],  # noqa: B006
    out: OutOption = None,
    data: DataOption = None,
    model: ModelOption = None,
    overwrite: OverwriteOption = False,
    no_privacy: Annotated[bool, typer.Option(help="Drop the config's privacy section.")] = False,
    secure: Annotated[bool, typer.Option(
        help="TLS with a CA made for the run, and SuperNode authentication.")] = False,
) -> None:
    """Run on a Flower federation on this machine: a SuperLink and N SuperNodes on 127.0.0.1
    (free ports), the data split as `privlora run` splits it; same run directory."""
    from privlora.flower.local import DeploymentFailed, run_local
    from privlora.progress import print_summary

    def show(row: dict) -> None:
        eps = row.get("epsilon")
        acc = row.get("accuracy")
        typer.echo(f"round {row['round']}: accuracy "
                   + ("-" if acc is None else f"{acc:.3f}")
                   + ("" if eps is None else f", epsilon {eps}"), err=True)

    try:
        cfg = _run_config(config, [*set_, f"federation.num_clients={clients}"], data, model,
                          no_privacy)
        out_dir = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        result = run_local(cfg, out_dir, overwrite=overwrite, secure=secure, on_round=show)
    except (*_USER_ERRORS, DeploymentFailed) as err:
        _fail(err)
    left_out = [line for line in result.server_log.splitlines()
                if "left out" in line or "update refused" in line]
    for line in left_out:  # the operator runs every site here: the server's reasons are theirs
        typer.echo(line, err=True)
    print_summary(result.summary, out_dir)


@flower_app.command("app")
def flower_app_dir() -> None:
    """Print the Flower App directory: `flwr run "$(privlora flower app)" CONNECTION ...`."""
    from privlora.flower import app_dir

    typer.echo(str(app_dir()))


@flower_app.command("worker")
def flower_worker(
    runtime_api_address: Annotated[str, typer.Option(
        help="The SuperNode's Runtime API, HOST:PORT (its --host and --port).")],
    insecure: Annotated[bool, typer.Option(
        help="Plain HTTP to the Runtime API (the SuperNode runs without --ssl-certfile).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(
        help="CA certificate of the Runtime API's TLS (the SuperNode's --ssl-ca-certfile).")] = None,
) -> None:
    """Run a SuperNode's ClientApps from one warm process: start the SuperNode with
    `--isolation process`, then this beside it (it replaces Flower's SuperExec; each message
    runs in a child forked with everything imported, about 5 s sooner)."""
    from privlora.flower.worker import serve

    if not insecure and root_certificates is None:
        _fail(ConfigError("give --insecure (the SuperNode's Runtime API has no TLS) or "
                          "--root-certificates (its CA)"))
    serve(runtime_api_address, insecure, root_certificates)


@flower_app.command("certs")
def flower_certs(
    out: Annotated[Path, typer.Option(help="Directory to create for the certificates and keys.")],
    host: Annotated[str, typer.Option(help="The SuperLink's IP address or DNS name.")],
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make (node0, node1, ...).")] = 0,
) -> None:
    """Make a CA, the SuperLink's TLS certificate for HOST and SuperNode key pairs."""
    from privlora.flower import certs

    if out.exists():
        _fail(ConfigError(f"--out {out} already exists; choose a new directory"))
    made = certs.server_certs(out, host)
    keys = [certs.node_keys(out, f"node{k}") for k in range(nodes)]
    typer.echo(f"CA {made.ca}; SuperLink certificate {made.cert} and key {made.key}"
               + "".join(f"; SuperNode key {private} (register {public})"
                         for private, public in keys))


@app.command("eval")
def eval_(
    adapter: Annotated[Path, typer.Option(help="Adapter directory saved by `privlora run`.")],
    data: Annotated[str | None, typer.Option(help="JSONL to score (default: the run's eval split).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the run's).")] = None,
) -> None:
    """Evaluate a saved adapter (stock PEFT loading) on the run's eval split or a JSONL file."""
    from privlora.evaluate_adapter import evaluate_adapter

    try:
        result = evaluate_adapter(adapter, data, model)
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo(json.dumps(result, indent=2))


@app.command()
def quantize(
    scheme: Annotated[str, typer.Option(
        help="q8_0, q5_0, q5_1, q4_0, q4_1, tq2_0 (gguf's quantizers) or nf4 (bitsandbytes).")],
    out: Annotated[Path, typer.Option(help="Bundle directory to create.")],
    model: Annotated[str, typer.Option(
        help="'builtin', a .gguf file, a Hugging Face directory or hub id.")] = "builtin",
) -> None:
    """Write the quantized base-model bundle a FedLPP client receives (GGUF + manifest)."""
    from privlora.models import load_model, load_tokenizer
    from privlora.quantization.bundle import write_bundle
    from privlora.quantization.schemes import BASE_SCHEMES

    try:
        if scheme not in BASE_SCHEMES:
            raise BundleError(f"--scheme {scheme!r} is not one of {sorted(BASE_SCHEMES)}")
        if out.exists():
            raise BundleError(f"--out {out} already exists; remove it or choose another path")
        manifest = write_bundle(load_model(model, "float32", "cpu"), load_tokenizer(model),
                                scheme, out, model)
    except _USER_ERRORS as err:
        _fail(err)
    numel = sum(math.prod(t.shape) for t in manifest.tensors)
    types = Counter(t.type for t in manifest.tensors)
    same = sum(t.identical and t.type != "F32" for t in manifest.tensors)
    typer.echo(f"{out}: weights {manifest.model_bytes:,} bytes ({8 * manifest.model_bytes / numel:.2f}"
               f" bits per weight, {manifest.model_bytes / manifest.full_precision_bytes:.3f}x "
               f"float32), {manifest.total_bytes:,} bytes with config and tokenizer; tensors "
               f"{dict(sorted(types.items()))}"
               + (f"; {same} quantized tensors equal the source's values exactly" if same else ""))


@privacy_app.command("epsilon")
def privacy_epsilon(
    noise_multiplier: Annotated[float, typer.Option(help="sigma = noise std / sensitivity")],
    sample_rate: Annotated[float, typer.Option(help="Poisson sampling rate q in (0, 1]")],
    steps: Annotated[int, typer.Option(help="number of composed steps")],
    delta: Annotated[float, typer.Option()],
    accountant: Annotated[str, typer.Option(help="pld or rdp")] = "pld",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print epsilon of T Poisson-subsampled Gaussian steps."""
    from privlora.privacy import accounting

    try:
        _check_accountant(accountant)
        accounting.validate_sample_rate(sample_rate, "--sample-rate")
        accounting.validate_noise_multiplier(noise_multiplier, "--noise-multiplier")
        event = accounting.sample_mode_event(sample_rate, noise_multiplier, steps)
        eps = accounting.epsilon(event, delta, accountant)
    except _USER_ERRORS as err:
        _fail(err)
    result = {"epsilon": eps, "delta": delta, "accountant": accountant}
    typer.echo(json.dumps(result) if as_json else f"epsilon = {eps:.4f} at delta = {delta} ({accountant})")


@privacy_app.command("calibrate")
def privacy_calibrate(
    target_epsilon: Annotated[float, typer.Option()],
    delta: Annotated[float, typer.Option()],
    sample_rate: Annotated[float, typer.Option()],
    steps: Annotated[int, typer.Option()],
    accountant: Annotated[str, typer.Option(help="pld or rdp")] = "pld",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the smallest noise multiplier whose epsilon is <= the target (within 2%)."""
    from privlora.privacy import accounting

    try:
        _check_accountant(accountant)
        accounting.validate_sample_rate(sample_rate, "--sample-rate")
        if target_epsilon <= 0:
            raise ConfigError(f"--target-epsilon = {target_epsilon} must be > 0")
        if not 0 < delta < 1:
            raise ConfigError(f"--delta = {delta} must be in (0, 1)")
        sigma, eps = accounting.calibrate_noise_multiplier(
            lambda s: accounting.sample_mode_event(sample_rate, s, steps), target_epsilon, delta,
            accountant)
    except _USER_ERRORS as err:
        _fail(err)
    result = {"noise_multiplier": sigma, "epsilon": eps}
    typer.echo(json.dumps(result) if as_json else f"noise_multiplier = {sigma:.4f} (epsilon = {eps:.4f})")


@privacy_app.command("plan")
def privacy_plan(
    config: Annotated[Path, typer.Option(help="Run config TOML file.")],
    set_: Annotated[list[str], typer.Option("--set", help="Override: key=value.")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print a run's privacy plan: events, sigma, epsilon, and the local-mode noise variance."""
    from privlora.privacy.report import plan_report

    try:
        report = plan_report(config, list(set_))
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo(json.dumps(report, indent=2, default=str) if as_json else report["text"])


@app.command()
def audit(
    config: ConfigOption = None,
    set_: SetOption = [],  # noqa: B006
    out: Annotated[Path, typer.Option(help="Directory for audit.json and audit.png.")] = Path(
        "runs/audit"),
    canaries: Annotated[int, typer.Option(help="Canaries of each kind.")] = 1000,
    kinds: Annotated[str | None, typer.Option(
        help="Comma-separated canary kinds (gradient, input, client, release); default: every "
             "kind the privacy mode takes.")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train once with canaries; print the empirical epsilon lower bound beside the
    accountant's (one-run audit, Steinke, Nasr & Jagielski 2023)."""
    try:
        cfg = _run_config(config, set_, None, None, False)
        from privlora.audit import run_audit
        from privlora.progress import RichProgress

        with RichProgress(cfg) as progress:
            result = run_audit(cfg, out, canaries, progress, overwrite,
                               kinds.split(",") if kinds else None)
    except _USER_ERRORS as err:
        _fail(err)
    for found in result["kinds"]:
        typer.echo(f"{found['canary_kind']}: epsilon lower bound "
                   f"{found['epsilon_lower_bound']:.3f} (confidence {result['confidence']}, "
                   f"{found['correct']} of {found['guesses']} guesses right, "
                   f"{found['canaries']} canaries, AUC {found['auc']:.3f})")
    typer.echo(f"accountant epsilon {result['epsilon_accountant']:.3f} at delta "
               f"{result['delta']}; {out / 'audit.json'}")


@site_app.command("budget")
def site_budget(
    ledger: Annotated[Path, typer.Option(help="The site's ledger file (node-config ledger).")],
    delta: Annotated[float | None, typer.Option(
        help="State epsilon at this delta (default: the site's own, from the file).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print what a site's data has spent: epsilon per run and in total (PLD)."""
    from privlora.privacy.site import spend_by_run

    try:
        if not ledger.is_file():
            raise ConfigError(f"--ledger {ledger}: no such file; give the path a site's "
                              "node-config names as ledger (default: its data file + "
                              "'.ledger.json')")
        rows = spend_by_run(ledger, delta)
    except _USER_ERRORS as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        typer.echo(f"data {row['dataset'][:12]}  run {row['run'][:12]:12}  rounds "
                   f"{row['rounds']:4d}  modes {','.join(row['modes']):14}  epsilon "
                   f"{row['epsilon']:.3f}")


def _check_accountant(name: str) -> None:
    if name not in ("pld", "rdp"):
        raise ConfigError(f"--accountant = {name!r}; choose pld or rdp")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
