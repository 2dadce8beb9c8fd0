"""JSON from outside the process (data files, payload headers, wire indexes), parsed with its
nesting bounded before the parser recurses.

``json.loads`` recurses once per level of nesting. A line of thousands of ``[`` runs the
interpreter to its recursion limit before the parser gives up, and any finalizer the garbage
collector runs at that depth fails inside the error hook (a CI run failed that way). Nothing
privlora reads nests deeper than a few levels, so deeper text is refused before parsing.
"""

from __future__ import annotations

import json

MAX_NESTING = 64


class TooDeep(ValueError):
    """JSON nested deeper than MAX_NESTING levels."""


def too_deep(text: str, limit: int = MAX_NESTING) -> bool:
    """Whether arrays and objects in ``text`` nest more than ``limit`` levels deep; brackets
    inside strings do not count. Text that is not JSON gets some answer, and ``json.loads`` then
    refuses it."""
    if text.count("[") + text.count("{") <= limit:  # cheap: cannot be too deep
        return False
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def loads(text: str | bytes) -> object:
    """``json.loads`` that raises TooDeep, without recursing, for text nested too deeply."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")
    if too_deep(text):
        raise TooDeep(f"JSON nested more than {MAX_NESTING} levels deep")
    return json.loads(text)
