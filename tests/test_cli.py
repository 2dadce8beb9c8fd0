"""The command line: subcommands work, and bad input gives one line, exit code 2, no traceback."""

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privlora.cli import app
from privlora.privacy import accounting

runner = CliRunner()
TINY = ["--model", "tiny-random", "--set", "model.dtype=float32", "--set",
        "data.builtin_examples=80", "--set", "data.max_eval=8", "--set", "federation.rounds=1",
        "--set", "train.local_steps=1", "--set", "train.batch_size=2"]


def cli(*args):
    """Run the real console script in a subprocess: exit code, stdout, stderr."""
    done = subprocess.run([sys.executable, "-m", "privlora", *args], check=False, capture_output=True,
                          text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


# `python -m privlora` once per command line, all in one interpreter: each runs the package's
# __main__ with its own sys.argv, its stdout and stderr (file descriptors 1 and 2, so whatever
# writes there is caught) in files of its own; an uncaught exception prints its traceback
# there, as the interpreter would, and exits 1.
_MANY = """
import json, os, runpy, sys, tempfile, traceback
results = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = ["privlora", *argv]
        try:
            runpy.run_module("privlora", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        results.append([code, out.read().decode(), err.read().decode()])
print(json.dumps(results))
"""


def cli_many(argvs: list[list[str]]) -> list[tuple[int, str, str]]:
    """``cli`` for each command line, in one subprocess: (exit code, stdout, stderr) each.

    Why: a `privlora` process spends about 4 s importing torch, transformers and PEFT before
    it can refuse a run that names a missing model; this module's refusals pay it once.
    """
    done = subprocess.run([sys.executable, "-c", _MANY, json.dumps(argvs)], check=False,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(r) for r in json.loads(done.stdout.splitlines()[-1])]


def assert_one_line_error(code, stderr, *words):
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One `privlora run` of TINY, read by the tests below (a test that writes into a run
    directory writes into a copy)."""
    out = tmp_path_factory.mktemp("cli") / "r"
    code, _, err = cli("run", *TINY, "--out", str(out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def refused(tmp_path_factory, tiny_run) -> tuple[Path, dict]:
    """Every command line of this module that is to be refused, run once by ``cli_many``:
    (their folder, {command line as a tuple: (exit code, stdout, stderr)}). The second run
    into an existing run goes into a copy of ``tiny_run``, ``existing``."""
    where = tmp_path_factory.mktemp("refused")
    (where / "empty.jsonl").write_text("")
    (where / "bad.jsonl").write_text(BAD_JSONL)
    (where / "new.jsonl").write_text(UNKNOWN_LABEL)
    shutil.copytree(tiny_run, where / "existing")
    argvs = [["run", *TINY, *args] for args, _ in RUN_REFUSALS]
    argvs += [["run", *TINY, "--out", str(where / "existing")]]
    argvs += [["run", *TINY, "--data", str(where / name)] for name in ("empty.jsonl", "bad.jsonl")]
    argvs += [["eval", "--adapter", str(tiny_run / "adapter"), "--data", str(where / "new.jsonl")]]
    argvs += [["privacy", *args] for args, _ in PRIVACY_REFUSALS]
    argvs += [["quantize", *args, "--out", str(where / f"quantize{i}")]
              for i, (args, _) in enumerate(QUANTIZE_REFUSALS)]
    argvs += [["flower", "local", *args, *TINY, "--out", str(where / f"flower{i}")]
              for i, (args, _) in enumerate(FLOWER_LOCAL_REFUSALS)]
    argvs += [["flower", "worker", "--runtime-api-address", "127.0.0.1:1"]]
    return where, dict(zip(map(tuple, argvs), cli_many(argvs), strict=True))


def test_run_and_eval_round_trip(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    code, out, err = cli("eval", "--adapter", str(tiny_run / "adapter"))
    assert code == 0, err
    assert json.loads(out)["accuracy"] == summary["final"]["accuracy"]
    config = tomllib.loads((tiny_run / "config.toml").read_text())
    assert summary["model_dtype"] == config["model"]["dtype"]  # set explicitly: kept as set


RUN_REFUSALS = [
    (["--set", "federation.roundz=2"], ["federation.roundz", "federation.rounds"]),
    (["--set", "federation.rounds=\"two\""], ["federation.rounds", "int"]),
    (["--set", "privacy.mode=sample", "--set", "privacy.target_epsilon=-1"],
     ["privacy.target_epsilon"]),
    (["--set", "federation.num_clients=200"], ["num_clients"]),
    (["--data", "/nonexistent/data.jsonl"], ["/nonexistent/data.jsonl", "does not exist"]),
    (["--set", "lora.target_modules=[\"q_prj\"]"], ["lora.target_modules", "q_prj", "'q_proj'"]),
    (["--model", "/nonexistent/model-dir"], ["/nonexistent/model-dir", "no such directory"]),
    (["--model", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf", "no such GGUF file"]),
    (["--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1"],
     ["privacy.sample_rate", "privacy plan"]),
    (["--set", "privacy.secure_rng=true"], ["privacy.reproducible_noise"]),
]


@pytest.mark.parametrize("args, words", RUN_REFUSALS)
def test_run_bad_input(refused, args, words):
    code, _, err = refused[1][("run", *TINY, *args)]
    assert_one_line_error(code, err, *words)


def test_run_into_an_existing_run_is_refused_and_the_old_run_survives(refused, tiny_run):
    out = refused[0] / "existing"  # a copy of tiny_run, into which `refused` ran TINY again
    code, _, err = refused[1][("run", *TINY, "--out", str(out))]
    assert_one_line_error(code, err, str(out), "--overwrite")
    before = {p.relative_to(tiny_run): p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()}
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _, err = cli("run", *TINY, "--out", str(out), "--overwrite")
    assert code == 0, err


BAD_JSONL = '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\nnot json\n'


def test_run_bad_data_files(refused):
    where, results = refused
    code, _, err = results[("run", *TINY, "--data", str(where / "empty.jsonl"))]
    assert_one_line_error(code, err, "empty")
    code, _, err = results[("run", *TINY, "--data", str(where / "bad.jsonl"))]
    assert_one_line_error(code, err, "bad.jsonl:3")


UNKNOWN_LABEL = ('{"text": "my bill is wrong", "label": "green"}\n'
                 '{"text": "parcel lost", "label": "purple"}\n')


def test_eval_unknown_label(refused, tiny_run):
    where, results = refused
    code, _, err = results[("eval", "--adapter", str(tiny_run / "adapter"), "--data",
                            str(where / "new.jsonl"))]
    assert_one_line_error(code, err, "purple", "row 2")


def test_privacy_epsilon_and_calibrate_json():
    result = runner.invoke(app, ["privacy", "epsilon", "--noise-multiplier", "1.0",
                                 "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5",
                                 "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    expected = accounting.epsilon(accounting.sample_mode_event(0.01, 1.0, 1000), 1e-5, "pld")
    assert got == {"epsilon": pytest.approx(expected), "delta": 1e-5, "accountant": "pld"}
    result = runner.invoke(app, ["privacy", "calibrate", "--target-epsilon", str(got["epsilon"]),
                                 "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000",
                                 "--json"])
    assert result.exit_code == 0, result.output
    calibrated = json.loads(result.output)
    assert calibrated["noise_multiplier"] == pytest.approx(1.0, rel=0.03)
    assert 0.98 * got["epsilon"] <= calibrated["epsilon"] <= got["epsilon"]


PRIVACY_REFUSALS = [
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10",
      "--delta", "1e-5"], "--sample-rate"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10",
      "--delta", "1e-5", "--accountant", "xyz"], "--accountant"),
    (["calibrate", "--target-epsilon", "0", "--delta", "1e-5", "--sample-rate", "0.1",
      "--steps", "10"], "--target-epsilon"),
]


@pytest.mark.parametrize("args, word", PRIVACY_REFUSALS)
def test_privacy_cli_bad_input(refused, args, word):
    code, _, err = refused[1][("privacy", *args)]
    assert_one_line_error(code, err, word)


def plan_json(tmp_path, privacy: str) -> dict:
    """`privlora privacy plan --json` for the tiny model with this [privacy] section."""
    config = tmp_path / "plan.toml"
    config.write_text('[model]\nname = "tiny-random"\n[data]\nbuiltin_examples = 120\n'
                      f"[privacy]\n{privacy}")
    result = runner.invoke(app, ["privacy", "plan", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_privacy_plan_reports_local_variance(tmp_path):
    report = plan_json(tmp_path, 'mode = "local"\ntarget_epsilon = 8.0\nclip = 0.5\n')
    assert report["sensitivity"] == 1.0 and report["mode"] == "local"
    assert 0.98 * 8 <= report["epsilon_pld"] <= 8
    v = report["variance"]
    assert v["expected_sq_frobenius"] > v["cross_term"] > 0
    assert "unbiased" in report["text"] and "2 x clip" in report["text"]


def test_privacy_plan_suggests_a_sample_rate_from_the_sizes_it_sees(tmp_path):
    report = plan_json(tmp_path, 'mode = "sample"\ntarget_epsilon = 8.0\n')
    # 96 training rows over 4 clients: 24 each; train.batch_size = 8
    assert report["suggested_sample_rate"] == report["sample_rate"] == 8 / 24
    assert "suggested privacy.sample_rate = 0.3333" in report["text"]


def test_no_privacy_runs_a_private_config_without_dp(tmp_path):
    private = ["--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1",
               "--set", "privacy.sample_rate=0.1"]
    result = runner.invoke(app, ["run", *TINY, *private, "--no-privacy", "--out",
                                 str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["privacy"] is None
    assert "[privacy]\nmode = \"none\"" in (tmp_path / "r" / "config.toml").read_text()


def test_quantize_writes_a_bundle_a_client_can_load(tmp_path):
    from privlora.quantization.bundle import load_bundle

    code, out, err = cli("quantize", "--model", "tiny-random", "--scheme", "q8_0",
                         "--out", str(tmp_path / "bundle"))
    assert code == 0, err
    assert "bits per weight" in out and "Q8_0" in out
    _, manifest = load_bundle(tmp_path / "bundle", dtype="float32")
    assert manifest.scheme == "q8_0" and manifest.source == "tiny-random"


QUANTIZE_REFUSALS = [
    (["--scheme", "q3_k"], ["--scheme", "q3_k"]),
    (["--scheme", "q4_0", "--model", "/no/such/model"], ["model.name", "/no/such/model"]),
]


@pytest.mark.parametrize("args,words", QUANTIZE_REFUSALS)
def test_quantize_bad_input(refused, args, words):
    out = refused[0] / f"quantize{QUANTIZE_REFUSALS.index((args, words))}"
    code, _, err = refused[1][("quantize", *args, "--out", str(out))]
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def test_run_with_a_quantized_base_prints_what_clients_hold(tmp_path):
    code, out, err = cli("run", *TINY, "--set", "quantization.base=q8_0", "--out",
                         str(tmp_path / "run"))
    assert code == 0, err
    assert "base model sent to clients (q8_0)" in out and "client-visible accuracy" in out


FLOWER_LOCAL_REFUSALS = [
    (["--clients", "0"], ["federation.num_clients = 0"]),
    (["--clients", "2", "--config", "missing.toml"], ["missing.toml"]),
    (["--clients", "2", "--set", "privacy.mode=client", "--set", "privacy.target_epsilon=0.01",
      "--set", "privacy.noise_multiplier=0.5"], ["target_epsilon"]),
]


@pytest.mark.parametrize(("args", "words"), FLOWER_LOCAL_REFUSALS)
def test_flower_local_bad_input_starts_nothing(refused, args, words):
    out = refused[0] / f"flower{FLOWER_LOCAL_REFUSALS.index((args, words))}"
    code, _, err = refused[1][("flower", "local", *args, *TINY, "--out", str(out))]
    assert_one_line_error(code, err, *words)
    assert "logs are kept" not in err  # refused before any daemon started
    assert not out.exists()


def test_a_flower_worker_needs_to_be_told_how_to_reach_its_supernode(refused):
    code, _, err = refused[1][("flower", "worker", "--runtime-api-address", "127.0.0.1:1")]
    assert_one_line_error(code, err, "--insecure", "--root-certificates")


def test_flower_app_and_certs(tmp_path):
    code, out, err = cli("flower", "app")
    assert code == 0, err
    assert "[tool.flwr.app.components]" in (Path(out.strip()) / "pyproject.toml").read_text()
    code, out, err = cli("flower", "certs", "--out", str(tmp_path / "c"), "--host", "10.0.0.5",
                         "--nodes", "2")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "ca.crt", "node0", "node0.pub", "node1", "node1.pub", "server.key", "server.pem"]
    code, _, err = cli("flower", "certs", "--out", str(tmp_path / "c"), "--host", "10.0.0.5")
    assert_one_line_error(code, err, "already exists")


def test_a_label_loss_run_reports_the_loss_it_trained(tmp_path):
    result = runner.invoke(app, ["run", *TINY, "--set", "train.loss=label", "--out",
                                 str(tmp_path / "r")], env={"COLUMNS": "200"})  # no wrapping
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["trained_loss"] == "label"
    assert summary["final"]["label_loss"] > 0 and summary["zero_shot"]["label_loss"] > 0
    assert "eval loss over the label words (trained)" in result.output
    assert "eval loss of the whole answer (not trained)" in result.output
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["label_loss"] is not None for r in rows)
    assert (tmp_path / "r" / "report.png").stat().st_size > 0


def test_a_run_reports_the_fall_in_loss_with_its_paired_error(tmp_path):
    result = runner.invoke(app, ["run", *TINY, "--out", str(tmp_path / "r")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    drop = summary["loss_drop"]
    assert drop["value"] == pytest.approx(summary["zero_shot"]["loss"] - summary["final"]["loss"],
                                          rel=1e-4, abs=1e-6)
    assert drop["se"] > 0 and summary["final"]["loss_se"] > 0
    assert "losses" not in summary["final"]  # per-example losses stay in memory
    assert f"(fall +/- {drop['se']:.3f}, 1 standard error)" in result.output
