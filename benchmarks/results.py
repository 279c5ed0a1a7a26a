"""Write a named section of benchmarks/RESULTS.md, replacing the old one of that name."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _section(title: str) -> re.Pattern:
    """A "## title" section of RESULTS.md, up to the next section or the end."""
    return re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)


def write_section(title: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in benchmarks/.\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = _section(title)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")


def read_section(title: str) -> str:
    """The body of the named section of RESULTS.md ("" when there is none)."""
    match = _section(title).search(RESULTS.read_text()) if RESULTS.exists() else None
    return match.group(0).split("\n", 1)[1].strip() if match else ""


def publish(title: str, body: str, write: bool = True) -> None:
    """Print a benchmark's table and note, and (write) make them the named section of RESULTS.md."""
    print(body)
    if write:
        write_section(title, body)


def remove_section(title: str) -> None:
    """Drop a named section of benchmarks/RESULTS.md (a study that a newer one replaced)."""
    if not RESULTS.exists():
        return
    RESULTS.write_text(_section(title).sub("", RESULTS.read_text()).rstrip() + "\n")
