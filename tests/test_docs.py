"""The documentation site builds with ``mkdocs build --strict``: a broken link, a missing page or an API reference
that no longer resolves fails the build (and this test). The method pages are generated from the registry."""

from __future__ import annotations

import html
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("material", reason="mkdocs-material is not installed")
pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed")


def test_site_builds_strictly_with_a_page_per_method(tmp_path: Path) -> None:
    from peftkit.core.registry import all_methods

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    site = tmp_path / "site"
    for info in all_methods():
        page = site / "methods" / info.name / "index.html"
        assert page.is_file(), f"no page for method {info.name}"
        text = page.read_text()
        assert html.escape(info.paper[:15], quote=False) in text, info.name  # the paper (wrapped lines: its start)
        assert html.escape(info.config.__name__, quote=False) in text, info.name  # the config fields are listed
    assert (site / "api" / "index.html").read_text().count("peftkit.adapt") > 0
