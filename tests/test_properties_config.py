"""Properties of config loading, over every field of every section (read from the dataclasses,
so a new field is covered the day it is added): a value of the wrong type, out of the field's
range, an unknown key, or a section replaced by a scalar is refused with one ConfigError line
naming the field; any well-typed config loads (and survives to_toml) or is refused the same way.
``privlora run --config BAD`` exits 2 with one ``error:`` line and leaves --out as it was."""

from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from privlora.config import RunConfig, config_from_toml, load_config, to_toml
from privlora.errors import ConfigError

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _fields() -> dict[str, tuple[Any, Any]]:
    """Return every config key ('seed', 'lora.rank', ...) -> (type hint, default)."""
    hints = typing.get_type_hints(RunConfig)
    found = {}
    for top in dataclasses.fields(RunConfig):
        if top.metadata.get("internal"):  # RunConfig.explicit: not a setting
            continue
        cls = hints[top.name]
        if not dataclasses.is_dataclass(cls):
            found[top.name] = (cls, top.default)
            continue
        inner = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            found[f"{top.name}.{f.name}"] = (inner[f.name], default)
    return found


FIELDS = _fields()
SECTIONS = sorted({key.split(".")[0] for key in FIELDS if "." in key})
KEYS = sorted(FIELDS)


# --- TOML text for any value a TOML file can hold -----------------------------------------------

def toml_string(text: str) -> str:
    escaped = "".join(f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F or ch in '"\\'
                      else ch for ch in text)
    return f'"{escaped}"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 'nan', 'inf', '-inf' and '1e+300' are TOML
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_text(raw: dict[str, Any]) -> str:
    """Render a config as TOML: top-level keys first, then one [table] per dict."""
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in raw.items()
             if not isinstance(v, dict)]
    for section, body in raw.items():
        if isinstance(body, dict):
            lines.append(f"[{toml_string(section)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def load_text(tmp_path: Path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def refused(tmp_path: Path, flat: dict[str, Any]) -> str:
    """Load ``flat`` from a TOML file; return the one-line ConfigError message it must raise."""
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, toml_text(nested(flat)))
    message = str(err.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --- values ---------------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
scalar = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), text, st.dates())
toml_values = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=6)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` (from TOML) has a type the field takes, whatever its range."""
    origin = get_origin(hint)
    if origin is Literal:
        return isinstance(value, str) and value in get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return accepts(next(a for a in get_args(hint) if a is not type(None)), value)
    if origin is tuple:
        inner = get_args(hint)[0]
        return (isinstance(value, list) and all(accepts(inner, v) for v in value)) or (
            isinstance(value, str) and accepts(inner, value))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def well_typed(hint: Any) -> st.SearchStrategy:
    origin = get_origin(hint)
    if origin is Literal:
        return st.sampled_from(get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return well_typed(next(a for a in get_args(hint) if a is not type(None)))
    if origin is tuple:
        return st.lists(well_typed(get_args(hint)[0]), max_size=3)
    return {int: st.integers(-3, 300) | st.integers(-2**63, 2**63 - 1),
            float: st.floats(-2, 20) | st.floats(), str: text, bool: st.booleans()}[hint]


def unwrap(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in get_args(hint) if a is not type(None))
    return hint


# Per field: values out of its range, and settings that make the range apply (a privacy field
# is only checked under a DP mode). Floats are also refused as NaN or inf, everywhere.
SAMPLE = {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0, "privacy.sample_rate": 0.01}
ints_below = st.integers(max_value=-1)
OUT_OF_RANGE: dict[str, tuple[st.SearchStrategy, dict[str, Any]]] = {
    "lora.rank": (st.integers(max_value=0), {}),
    "lora.alpha": (st.floats(max_value=0), {}),
    "lora.dropout": (st.floats(max_value=0, exclude_max=True) | st.floats(min_value=1), {}),
    "lora.target_modules": (st.sampled_from([[""], ["q_proj", ""]]), {}),  # [] = the default
    "lora.client_ranks": (st.lists(st.integers(max_value=0) | st.integers(min_value=9),
                                   min_size=1, max_size=3),
                          {"lora.rank": 8, "federation.aggregation": "exact"}),
    "lora.last_layers": (ints_below, {}),
    "model.name": (st.just(""), {}),
    "data.path": (st.just(""), {}),
    "data.eval_fraction": (st.floats(max_value=0) | st.floats(min_value=1), {}),
    "data.max_eval": (st.integers(max_value=0), {}),
    "data.dirichlet_alpha": (st.floats(max_value=0), {}),
    "data.max_length": (st.integers(max_value=15), {}),
    "data.builtin_examples": (st.integers(max_value=19), {}),
    "data.label_field": (st.just(""), {}),
    "data.examples_per_client": (ints_below, {}),
    "train.max_examples_processed": (ints_below, {}),
    "train.max_minutes": (st.floats(max_value=0, exclude_max=True), {"privacy.recipe": "auto"}),
    "federation.num_clients": (st.integers(max_value=0), {}),
    "federation.rounds": (st.integers(max_value=0), {}),
    "federation.clients_per_round": (ints_below | st.integers(min_value=5),
                                     {"federation.num_clients": 4}),
    "federation.client_fraction": (st.floats(max_value=0, exclude_max=True)
                                   | st.floats(min_value=1, exclude_min=True), {}),
    "federation.eval_every": (st.integers(max_value=0), {}),
    "federation.stop_on_noise": (ints_below, {}),
    "federation.min_clients": (st.integers(max_value=0) | st.integers(min_value=5),
                               {"federation.num_clients": 4}),
    "federation.round_timeout": (st.floats(max_value=0), {}),
    "federation.connect_timeout": (st.floats(max_value=0), {}),
    "train.local_steps": (st.integers(max_value=0), {}),
    "train.batch_size": (st.integers(max_value=0), {}),
    "train.microbatch": (st.integers(max_value=0), {}),
    "train.threads": (ints_below, {}),
    "train.lr": (st.floats(max_value=0), {}),
    "train.momentum": (st.floats(max_value=0, exclude_max=True) | st.floats(min_value=1),
                       {"train.optimizer": "sgd"}),
    "train.weight_decay": (st.floats(max_value=0, exclude_max=True), {}),
    "privacy.noise_multiplier": (st.floats(max_value=0),
                                 {"privacy.mode": "sample", "privacy.sample_rate": 0.01}),
    "privacy.target_epsilon": (st.floats(max_value=0), {"privacy.mode": "client"}),
    "privacy.delta": (st.floats(max_value=0) | st.floats(min_value=1), SAMPLE),
    "privacy.clip": (st.floats(max_value=0), SAMPLE),
    "privacy.sample_rate": (st.floats(max_value=0) | st.floats(min_value=1, exclude_min=True),
                            {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0}),
    "quantization.uplink_bits": (st.integers().filter(lambda n: n not in (0, 4, 8)), {}),
    "quantization.general_examples": (st.integers(max_value=0), {}),
    "quantization.public_examples": (st.integers(max_value=0), {}),
    "quantization.distill_steps": (st.integers(max_value=0), {}),
    "quantization.distill_lr": (st.floats(max_value=0), {}),
    "site.max_epsilon": (st.floats(max_value=0), {"site.delta": 1e-5}),
    "site.delta": (st.floats(max_value=0) | st.floats(min_value=1), {}),
    "site.modes": (st.lists(st.sampled_from(["none", "central", "x"]), min_size=1, max_size=2),
                   {}),
}
# Numeric fields any value of whose type is valid: say so here when adding one.
UNBOUNDED = {"seed"}


def test_every_numeric_field_has_a_range_or_is_declared_unbounded():
    numeric = {key for key, (hint, _) in FIELDS.items()
               if unwrap(hint) in (int, float)
               or (get_origin(hint) is tuple and get_args(hint)[0] in (int, float))}
    assert numeric - UNBOUNDED - set(OUT_OF_RANGE) == set()
    assert set(OUT_OF_RANGE) <= set(FIELDS)


@PROPERTY
@given(data=st.data())
def test_a_value_of_the_wrong_type_names_its_field(tmp_path, data):
    key = data.draw(st.sampled_from(KEYS))
    hint = FIELDS[key][0]
    value = data.draw(toml_values.filter(lambda v: not accepts(hint, v)), label=key)
    assert key in refused(tmp_path, {key: value})


@PROPERTY
@given(data=st.data())
def test_a_value_out_of_range_names_its_field(tmp_path, data):
    key = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    bad, context = OUT_OF_RANGE[key]
    if unwrap(FIELDS[key][0]) is float:
        bad = bad | non_finite
    value = data.draw(bad, label=key)
    message = refused(tmp_path, {**context, key: value})
    assert key in message


@PROPERTY
@given(section=st.sampled_from(["", *SECTIONS]), key=text.filter(bool))
def test_an_unknown_key_is_named(tmp_path, section, key):
    prefix = f"{section}." if section else ""
    known = {k.removeprefix(prefix).split(".")[0] for k in FIELDS if k.startswith(prefix)}
    if key in known or (section, key) == ("privacy", "secure_rng"):
        return
    raw = {section: {key: 1}} if section else {key: 1}  # one key, even if it holds a dot
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, toml_text(raw))
    assert "\n" not in str(err.value)
    assert f"unknown config key {prefix + key!r}" in str(err.value)


@PROPERTY
@given(section=st.sampled_from(SECTIONS), value=scalar | st.lists(scalar, max_size=2))
def test_a_section_given_as_a_value_is_named(tmp_path, section, value):
    message = refused(tmp_path, {section: value})
    assert message.startswith(f"{section} must be a table")


@pytest.mark.parametrize("section", SECTIONS)
def test_a_missing_section_takes_its_defaults(tmp_path, section):
    full = {key: default for key, (_, default) in FIELDS.items()
            if default is not None and "." in key}
    flat = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()
            if not k.startswith(f"{section}.")}
    assert load_text(tmp_path, toml_text(nested(flat))) == RunConfig()


@st.composite
def well_typed_configs(draw) -> dict[str, Any]:
    """A config whose every given value has its field's type; ranges and combinations free."""
    chosen = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=8))
    flat = {}
    for key in chosen:
        hint, default = FIELDS[key]
        keep = default is not None and draw(st.booleans())
        value = default if keep else draw(well_typed(hint), label=key)
        flat[key] = list(value) if isinstance(value, tuple) else value
    return flat


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
@given(flat=well_typed_configs())
def test_a_well_typed_config_loads_or_is_refused_in_one_line(tmp_path, flat):
    text = toml_text(nested(flat))
    try:
        config = load_text(tmp_path, text)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    # what a deployed server sends its sites reads back as the same config, and the same
    # values as --set overrides give the same config as the file
    assert config_from_toml(to_toml(config)) == config
    assert load_config(None, [f"{key}={toml_value(value)}" for key, value in flat.items()]) \
        == config


@PROPERTY
@given(key=st.sampled_from(KEYS), data=st.data())
def test_a_bad_override_is_refused_like_the_file(key, data):
    hint = FIELDS[key][0]
    value = data.draw(toml_values.filter(lambda v: not accepts(hint, v)), label=key)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={toml_value(value)}"])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_config_file_that_is_not_utf8_or_not_toml_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[lora]\nrank = 4\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.toml: line 3 is not UTF-8"):
        load_config(path)
    path.write_text("[lora\nrank = 4\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


# --- the command line -----------------------------------------------------------------------------

runner = CliRunner()
EARLIER_RUN = {"config.toml": "seed = 0\n", "metrics.jsonl": '{"round": 0}\n',
               "summary.json": "{}", "ledger.json": "{}", "adapter/adapter_config.json": "{}"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
@given(data=st.data(), overwrite=st.booleans())
def test_run_with_a_bad_config_exits_2_in_one_line_and_overwrites_nothing(tmp_path, data,
                                                                         overwrite):
    from privlora.cli import app

    key = data.draw(st.sampled_from(KEYS))
    hint = FIELDS[key][0]
    value = data.draw(toml_values.filter(lambda v: not accepts(hint, v)), label=key)
    config = tmp_path / "bad.toml"
    config.write_text(toml_text(nested({key: value})), encoding="utf-8")
    out = tmp_path / "earlier-run"
    for name, body in EARLIER_RUN.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(body)
    before = snapshot(out)
    result = runner.invoke(app, ["run", "--config", str(config), "--out", str(out),
                                 *(["--overwrite"] if overwrite else [])])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an escaped exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(out) == before
