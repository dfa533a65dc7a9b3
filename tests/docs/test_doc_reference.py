"""The API reference (docs/reference) follows the code: every ``:::`` target exists, the index documents every
name of the top-level ``clipforge`` API where it is defined, and every package has its page."""
from __future__ import annotations

import re

import pytest

import clipforge
from doc_checks import resolve
from doc_examples import REPO

REFERENCE = REPO / "docs" / "reference"
_DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.MULTILINE)
PACKAGES = ["models", "data", "io", "runtime", "train", "evaluate", "search", "serve"]


def _targets(page: str) -> list[str]:
    return _DIRECTIVE.findall((REFERENCE / page).read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", sorted(p.name for p in REFERENCE.glob("*.md")))
def test_every_target_exists(page):
    problems = [f"docs/reference/{page}: ::: {t}: {resolve(t)}" for t in _targets(page) if resolve(t)]
    assert not problems, "\n".join(problems)


def test_index_documents_the_top_level_api_where_it_is_defined():
    documented = set(_targets("index.md"))
    expected = {f"{module}.{name}" for name, module in clipforge._API.items()}
    missing, stale = sorted(expected - documented), sorted(documented - expected)
    assert not missing and not stale, f"docs/reference/index.md: add ::: {missing}; remove or fix ::: {stale}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_has_its_page(package):
    assert f"clipforge.{package}" in _targets(f"{package}.md")
