"""Properties of reading data files, through the functions a run and a site use (``load_task``,
``site_rows``): a malformed line, a missing or mistyped field, an empty file, bytes that are not
UTF-8, a huge line, a label outside the task's, or a repeated id is refused with one DataError
line that names the file and the line (blank lines counted) and says what to do, and that never
quotes a row's text (rows are private). Any other file loads or is refused the same way."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privlora import bounded_json
from privlora.config import DataConfig
from privlora.data import Task, load_task, site_rows
from privlora.errors import DataError

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
SECRET = "SECRET"  # in every row's text: no message may show it
LABELS = ("neg", "pos")
TASK = Task("t", "classification", "Classify.", LABELS, ())
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
blank = st.sampled_from([b"", b"  ", b"\t", b"\r", b" \r"])


@st.composite
def rows(draw) -> list[dict]:
    """Classification rows whose texts hold the secret, with both labels present."""
    n = draw(st.integers(2, 8))
    return [{"text": f"{SECRET}{k} {draw(text)}", "label": LABELS[k % 2]} for k in range(n)]


@st.composite
def with_blanks(draw, lines: list[bytes], marked: int | None) -> tuple[list[bytes], int | None]:
    """Insert blank lines anywhere; return the lines and the file line of ``lines[marked]``."""
    out, line = [], None
    for k, body in enumerate(lines):
        out += draw(st.lists(blank, max_size=2))
        out.append(body)
        if k == marked:
            line = len(out)
    out += draw(st.lists(blank, max_size=2))
    return out, line


def encoded(row: dict) -> bytes:
    # a lone surrogate goes out as its JSON escape \ud800, which json.loads reads back
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "backslashreplace")


def write(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "site.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def refused(call, path: Path, line: int | None) -> str:
    """Run ``call``; return the DataError it must raise: one line, naming the file and
    ``line``, saying what to do (after a ';'), and quoting no row's text."""
    with pytest.raises(DataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "; " in message, message
    assert SECRET not in message, message
    if line is not None:
        assert re.search(rf"{re.escape(str(path))}:{line}\b", message), (line, message)
    return message


def run_load(path: Path, **config):
    return lambda: load_task(DataConfig(path=str(path), **config), seed=0)


def site_load(path: Path):
    return lambda: site_rows(path, TASK, DataConfig())


# --- lines that are not one JSON object ------------------------------------------------------------

def not_an_object(line: str) -> bool:
    if "\n" in line or not line.strip():
        return False
    if bounded_json.too_deep(line):  # json.loads would recurse to the interpreter's limit
        return True
    try:
        return not isinstance(json.loads(line), dict)
    except ValueError:
        return True


malformed = st.one_of(
    text.map(lambda t: SECRET + t),  # prose, not JSON
    st.builds(lambda row, cut: encoded(row).decode()[:cut],  # a row cut short
              st.fixed_dictionaries({"text": text.map(lambda t: SECRET + t), "label": text}),
              st.integers(1, 12)),
    st.lists(text.map(lambda t: SECRET + t), max_size=3).map(json.dumps),  # an array
    st.just(json.dumps(SECRET)), st.integers().map(str), st.just("null"),
    st.just("[" * 50_000), st.just("1" * 5000),  # too deep, too long a number
    st.just('{"text": "' + SECRET + '", "label": "pos"} trailing'),
).filter(not_an_object)


@PROPERTY
@given(good=rows(), bad=malformed, at=st.integers(0, 8), data=st.data())
def test_a_line_that_is_not_a_json_object_is_named(tmp_path, good, bad, at, data):
    at = min(at, len(good))
    lines = [encoded(r) for r in good]
    lines.insert(at, bad.encode("utf-8"))
    lines, line = data.draw(with_blanks(lines, at))
    path = write(tmp_path, lines)
    refused(run_load(path), path, line)
    refused(site_load(path), path, line)


@PROPERTY
@given(good=rows(), at=st.integers(0, 8), junk=st.binary(min_size=1, max_size=4), data=st.data())
def test_bytes_that_are_not_utf8_are_named(tmp_path, good, at, junk, data):
    at = min(at, len(good) - 1)
    lines = [encoded(r) for r in good]
    lines[at] = lines[at][:3] + b"\xff" + junk + lines[at][3:]  # 0xff never occurs in UTF-8
    lines, line = data.draw(with_blanks(lines, at))
    path = write(tmp_path, lines)
    assert "UTF-8" in refused(run_load(path), path, line)
    refused(site_load(path), path, line)


@PROPERTY
@given(lines=st.lists(blank, max_size=4))
def test_an_empty_file_is_named(tmp_path, lines):
    path = tmp_path / "site.jsonl"
    path.write_bytes(b"\n".join(lines))
    assert "empty" in refused(run_load(path), path, None)
    assert "empty" in refused(site_load(path), path, None)


# --- rows with a field missing, empty or of the wrong type ---------------------------------------

def damage(row: dict, field: str, how: str, value) -> dict:
    row = dict(row)
    if how == "missing":
        del row[field]
    elif how == "empty":
        row[field] = value if value in (None, "") else None
    else:
        row[field] = value
    return row


wrong_text = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                       st.lists(st.just(SECRET), max_size=2),
                       st.dictionaries(st.just("k"), st.just(SECRET), max_size=1),
                       st.just(SECRET + "\ud800"))  # a lone surrogate: no tokenizer takes it
wrong_label = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(text, st.integers(),
                                                                              max_size=1))


@PROPERTY
@given(good=rows(), at=st.integers(0, 7), field=st.sampled_from(["text", "label"]),
       how=st.sampled_from(["missing", "empty", "wrong"]), data=st.data())
def test_a_row_with_a_missing_or_mistyped_field_is_named(tmp_path, good, at, field, how, data):
    at = min(at, len(good) - 1)
    value = data.draw(wrong_text if field == "text" else wrong_label)
    good[at] = damage(good[at], field, how, value)
    lines, line = data.draw(with_blanks([encoded(r) for r in good], at))
    path = write(tmp_path, lines)
    assert field in refused(run_load(path, kind="classification"), path, line)
    assert field in refused(site_load(path), path, line)
    if at > 0:  # the first row decides the kind; a later bad row is named in auto mode too
        refused(run_load(path), path, line)


@PROPERTY
@given(good=rows(), at=st.integers(0, 7), field=st.sampled_from(["question", "context",
                                                                 "answer"]), data=st.data())
def test_text_fields_name_the_row_that_lacks_one(tmp_path, good, at, field, data):
    at = min(at, len(good) - 1)
    qa = [{"question": r["text"], "context": SECRET, "answer": r["label"]} for r in good]
    qa[at] = damage(qa[at], field, data.draw(st.sampled_from(["missing", "empty"])), None)
    lines, line = data.draw(with_blanks([encoded(r) for r in qa], at))
    path = write(tmp_path, lines)
    config = {"text_fields": ("question", "context"), "label_field": "answer"}
    assert field in refused(run_load(path, **config), path, line)
    with pytest.raises(DataError, match=rf":{line}\b"):
        site_rows(path, TASK, DataConfig(**config))


# --- labels, ids, size ---------------------------------------------------------------------------

@PROPERTY
@given(good=rows(), at=st.integers(0, 7), label=text.filter(lambda t: t not in ("", *LABELS)),
       data=st.data())
def test_a_site_label_outside_the_tasks_is_named(tmp_path, good, at, label, data):
    at = min(at, len(good) - 1)
    good[at] = {**good[at], "label": label}
    lines, line = data.draw(with_blanks([encoded(r) for r in good], at))
    path = write(tmp_path, lines)
    message = refused(site_load(path), path, line)
    assert repr(label[:37] + "..." if len(label) > 40 else label) in message


@PROPERTY
@given(good=rows(), pair=st.lists(st.integers(0, 7), min_size=2, max_size=2, unique=True),
       ident=st.one_of(st.integers(), text), data=st.data())
def test_a_repeated_id_is_named_with_both_lines(tmp_path, good, pair, ident, data):
    first, second = sorted(min(k, len(good) - 1) for k in pair)
    if first == second:
        return
    good = [{**r, "id": f"row-{k}"} for k, r in enumerate(good)]
    good[first]["id"] = good[second]["id"] = ident
    lines, line = data.draw(with_blanks([encoded(r) for r in good], second))
    first_line = lines.index(encoded(good[first])) + 1
    path = write(tmp_path, lines)
    message = refused(run_load(path), path, line)
    assert f"line {first_line}" in message and "id" in message
    refused(site_load(path), path, line)


def test_distinct_ids_and_rows_without_ids_load(tmp_path):
    good = [{"text": "a", "label": "neg", "id": 1}, {"text": "b", "label": "pos", "id": "1"},
            {"text": "a", "label": "neg"}, {"text": "a", "label": "neg"}]
    path = write(tmp_path, [encoded(r) for r in good])
    assert len(load_task(DataConfig(path=str(path)), seed=0).rows) == 4


def test_a_huge_line_loads_if_it_is_a_row_and_is_named_but_not_quoted_if_not(tmp_path):
    huge = SECRET + "x" * 5_000_000
    good = [{"text": huge, "label": "neg"}, {"text": "short", "label": "pos"}]
    path = write(tmp_path, [encoded(r) for r in good])
    assert load_task(DataConfig(path=str(path)), seed=0).rows[0]["text"] == huge
    path = write(tmp_path, [encoded(good[1]), encoded(good[0])[:-2]])
    message = refused(run_load(path), path, 2)
    assert len(message) < 400


# --- anything else loads or is refused the same way ----------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                           lambda inner: st.lists(inner, max_size=2)
                           | st.dictionaries(text, inner, max_size=2), max_leaves=4)
field_names = st.sampled_from(["text", "label", "question", "answer", "context", "id"]) | text
any_row = st.dictionaries(field_names, json_values, max_size=5)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
@given(lines=st.lists(any_row.map(lambda r: json.dumps(r).encode()) | blank, max_size=6),
       config=st.sampled_from([{}, {"kind": "generation"},
                               {"text_fields": ("question", "context"), "label_field": "answer"}]))
def test_any_file_loads_or_is_refused_with_one_data_error_line(tmp_path, lines, config):
    path = write(tmp_path, lines)
    for call in (run_load(path, **config), lambda: site_rows(path, TASK, DataConfig(**config))):
        try:
            call()
        except DataError as err:
            assert "\n" not in str(err)
