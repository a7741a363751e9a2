"""BENCHMARKS.md writer: each benchmark owns one marked section and rewrites only that section.

A section is the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`. Writing a section replaces it in
place when its markers exist and appends it (after the existing text) when they do not, so benchmarks added later
never clobber each other's numbers or any hand-written text outside the markers.
"""
from __future__ import annotations

import re
from pathlib import Path

TITLE = "# Guidance Lab benchmarks"


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name {name!r} must be letters, digits, '_', '.' or '-'")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with section `name` set to `body` (markers included in the result)."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    i, j = text.find(start), text.find(end)
    if (i < 0) != (j < 0) or (i >= 0 and j < i):
        raise ValueError(f"malformed markers for section {name!r}: expected {start} … {end} once, in order")
    if i >= 0:
        if text.find(start, i + 1) >= 0 or text.find(end, j + 1) >= 0:
            raise ValueError(f"section {name!r} appears more than once")
        return text[:i] + block + text[j + len(end):]
    if not text.strip():
        return f"{TITLE}\n\n{block}\n"
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_section(path: str | Path, name: str, body: str) -> Path:
    """Replace (or append) section `name` of the Markdown file at `path`, creating the file with a title."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(replace_section(old, name, body), encoding="utf-8")
    return path
