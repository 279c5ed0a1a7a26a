"""The documentation site builds without a warning (mkdocs --strict): every page, link and API
reference resolves against the code as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "index.html").is_file() and (tmp_path / "resuming" / "index.html").is_file()
    # the equations are MathML in the page itself: they render offline, with no script from a CDN
    math_page = (tmp_path / "math" / "index.html").read_text()
    assert math_page.count('display="block"') >= 10 and "<msub>" in math_page
    assert "\\(" not in math_page and "$$" not in math_page, "TeX left unrendered"
    for page in tmp_path.rglob("*.html"):
        assert "cdn.jsdelivr.net" not in page.read_text() and "mathjax" not in page.read_text().lower(), page


def test_the_cli_page_lists_every_bundled_config():
    import re

    from lightning_sofo.cli import BUNDLED_CONFIGS

    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    table = page[page.index("| task | configs |"):].split("\n\n")[0]
    listed = set(re.findall(r"`([a-z0-9_]+)`", table))
    assert listed == {path.stem for path in BUNDLED_CONFIGS.glob("*.yaml")}
