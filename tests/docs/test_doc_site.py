"""The documentation site builds with ``mkdocs build --strict``: no broken link or anchor, no page missing
from the navigation, every API reference target found (what ``make docs`` runs)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from doc_examples import REPO


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    problems = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0, "\n".join(problems) or result.stderr[-4000:]
