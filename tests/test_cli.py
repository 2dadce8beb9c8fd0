"""The command line: subcommands work, and bad input gives one line, exit code 2, no traceback."""

import json
import subprocess
import sys
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


def assert_one_line_error(code, stderr, *words):
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0]


def test_run_and_eval_round_trip(tmp_path):
    code, out, err = cli("run", *TINY, "--out", str(tmp_path / "r"))
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    code, out, err = cli("eval", "--adapter", str(tmp_path / "r" / "adapter"))
    assert code == 0, err
    assert json.loads(out)["accuracy"] == summary["final"]["accuracy"]


@pytest.mark.parametrize("args, words", [
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
])
def test_run_bad_input(args, words):
    code, _, err = cli("run", *TINY, *args)
    assert_one_line_error(code, err, *words)


def test_run_into_an_existing_run_is_refused_and_the_old_run_survives(tmp_path):
    out = tmp_path / "r"
    code, _, err = cli("run", *TINY, "--out", str(out))
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = cli("run", *TINY, "--out", str(out))
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _, err = cli("run", *TINY, "--out", str(out), "--overwrite")
    assert code == 0, err


def test_run_bad_data_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = cli("run", *TINY, "--data", str(empty))
    assert_one_line_error(code, err, "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\nnot json\n')
    code, _, err = cli("run", *TINY, "--data", str(bad))
    assert_one_line_error(code, err, "bad.jsonl:3")


def test_eval_unknown_label(tmp_path):
    code, _, err = cli("run", *TINY, "--out", str(tmp_path / "r"))
    assert code == 0, err
    data = tmp_path / "new.jsonl"
    data.write_text('{"text": "my bill is wrong", "label": "green"}\n'
                    '{"text": "parcel lost", "label": "purple"}\n')
    code, _, err = cli("eval", "--adapter", str(tmp_path / "r" / "adapter"), "--data", str(data))
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


@pytest.mark.parametrize("args, word", [
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10",
      "--delta", "1e-5"], "--sample-rate"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10",
      "--delta", "1e-5", "--accountant", "xyz"], "--accountant"),
    (["calibrate", "--target-epsilon", "0", "--delta", "1e-5", "--sample-rate", "0.1",
      "--steps", "10"], "--target-epsilon"),
])
def test_privacy_cli_bad_input(args, word):
    code, _, err = cli("privacy", *args)
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


@pytest.mark.parametrize("args,words", [
    (["--scheme", "q3_k"], ["--scheme", "q3_k"]),
    (["--scheme", "q4_0", "--model", "/no/such/model"], ["model.name", "/no/such/model"]),
])
def test_quantize_bad_input(tmp_path, args, words):
    code, _, err = cli("quantize", *args, "--out", str(tmp_path / "b"))
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "b").exists()


def test_run_with_a_quantized_base_prints_what_clients_hold(tmp_path):
    code, out, err = cli("run", *TINY, "--set", "quantization.base=q8_0", "--out",
                         str(tmp_path / "run"))
    assert code == 0, err
    assert "base model sent to clients (q8_0)" in out and "client-visible accuracy" in out


@pytest.mark.parametrize(("args", "words"), [
    (["--clients", "0"], ["federation.num_clients = 0"]),
    (["--clients", "2", "--config", "missing.toml"], ["missing.toml"]),
    (["--clients", "2", "--set", "privacy.mode=client", "--set", "privacy.target_epsilon=0.01",
      "--set", "privacy.noise_multiplier=0.5"], ["target_epsilon"]),
])
def test_flower_local_bad_input_starts_nothing(tmp_path, args, words):
    code, _, err = cli("flower", "local", *args, *TINY, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, *words)
    assert "logs are kept" not in err  # refused before any daemon started
    assert not (tmp_path / "r").exists()


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
