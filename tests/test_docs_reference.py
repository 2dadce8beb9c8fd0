"""The documentation cannot drift: docs/reference.md is what docs/gen_reference.py renders from
the code now, and every relative link in README.md and docs/ reaches a file (and a heading)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs/gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_generated_from_the_code():
    expected = _generator().render()
    assert (ROOT / "docs/reference.md").read_text() == expected, (
        "docs/reference.md differs from the config dataclasses or the CLI: run `make docs`")


def test_reference_lists_every_config_key_and_command():
    import typer

    from privlora.cli import app
    from privlora.config import RunConfig, flat_values

    text = (ROOT / "docs/reference.md").read_text()
    for key in flat_values(RunConfig()):
        assert f"| `{key}` |" in text, key
    for name in typer.main.get_command(app).commands:
        assert f"### `privlora {name}`" in text, name


def _prose(text: str) -> str:
    """Drop fenced code blocks and inline code spans: links and headings live outside them."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """Return the heading anchors GitHub makes for ``page`` (lowercase, punctuation dropped,
    spaces to hyphens; a repeated heading gets -1, -2, ...)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(page: Path):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_links_are_checked_at_all():
    """Guard the regex: the README links into docs/, so the check above is not vacuous."""
    assert "docs/privacy.md" in LINK.findall((ROOT / "README.md").read_text())
