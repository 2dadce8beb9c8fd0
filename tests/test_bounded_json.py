"""bounded_json refuses JSON nested too deeply before the parser recurses, and otherwise reads
exactly what ``json.loads`` reads. The nesting count is checked against the depth of the value
that was written, computed by walking it."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privlora import bounded_json

# strings full of the characters the scan must skip inside strings
tricky = st.text(st.sampled_from('[]{}"\\ ab\u00e9'), max_size=6)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3),
    max_leaves=30)


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(value=values, limit=st.integers(0, 6), ascii_only=st.booleans())
def test_the_nesting_count_is_the_written_values_depth(value, limit, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert bounded_json.too_deep(text, limit) == (depth(value) > limit)
    if depth(value) <= bounded_json.MAX_NESTING:
        assert bounded_json.loads(text) == value
        assert bounded_json.loads(text.encode("utf-8")) == value


def test_json_at_the_limit_reads_and_one_level_more_is_refused():
    at_limit = "[" * bounded_json.MAX_NESTING + "]" * bounded_json.MAX_NESTING
    assert depth(bounded_json.loads(at_limit)) == bounded_json.MAX_NESTING
    with pytest.raises(bounded_json.TooDeep, match="more than 64 levels"):
        bounded_json.loads("[" + at_limit + "]")


def test_deep_text_is_refused_without_recursing():
    """With only a few dozen frames of recursion to spare, ``json.loads`` of deep text would
    raise RecursionError; the bounded reader refuses it as TooDeep (a ValueError)."""
    here = len(inspect.stack())
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(here + 40)
    try:
        with pytest.raises(RecursionError):
            json.loads("[" * 100_000)
        with pytest.raises(bounded_json.TooDeep):
            bounded_json.loads("[" * 100_000)
        with pytest.raises(bounded_json.TooDeep):
            bounded_json.loads('{"a": ' * 1000)
    finally:
        sys.setrecursionlimit(old)
