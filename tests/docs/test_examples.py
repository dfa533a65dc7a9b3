"""Every fenced ``python`` and ``bash`` block of README.md and docs/ (the API reference aside) is checked and
run: doc_examples.py has the markers that keep a block from running, doc_checks.py the checks every block gets."""
from __future__ import annotations

import re
import unicodedata

import pytest

from doc_checks import check_page
from doc_examples import README_MAX_LINES, REPO, display, pages, parse, run_page

PAGES = pages()
IDS = [display(p) for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_markers_are_known(page):
    _, problems = parse(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_examples_check(page):
    """Python compiles and its clipforge names exist; bash passes bash -n and its clipforge lines parse."""
    blocks, _ = parse(page)
    problems = check_page(blocks)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_examples_run(page, tmp_path, request, monkeypatch):
    blocks, _ = parse(page)
    if not any(b.marker is None for b in blocks):
        pytest.skip(f"{display(page)} has no block to run")
    if any("postgresql://" in b.source for b in blocks if b.marker is None):
        # a database of its own on the session's PostgreSQL, named the way the page says: PG* variables
        name = "page_" + re.sub(r"[^a-z0-9]+", "_", display(page).lower()).strip("_")
        for key, value in request.getfixturevalue("postgres").create_database(name).items():
            monkeypatch.setenv(key, value)
    problems = check_page(blocks)
    assert not problems, "the static checks fail, so the page was not run:\n" + "\n".join(problems)
    result = run_page(page, tmp_path / "work")
    assert result.returncode == 0, _tail(result.stdout)


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the depth into docs/")


def test_readme_links_resolve():
    """README.md is read on the forge, outside the site: its relative links must name files that exist (and
    headings that exist, for links into Markdown pages)."""
    readme = REPO / "README.md"
    problems = []
    for number, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), start=1):
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (readme.parent / path).resolve() if path else readme
            if not file.exists():
                problems.append(f"README.md:{number}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                problems.append(f"README.md:{number}: {target}: no heading with that anchor in {display(file)}")
    assert not problems, "\n".join(problems)


def _anchors(page) -> set[str]:
    """The anchors of a page's headings, as GitHub and as MkDocs (Python-Markdown's toc) make them."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", page.read_text(encoding="utf-8"), re.MULTILINE):
        text = re.sub(r"`|\*|_(?=\w)|(?<=\w)_|\[([^\]]*)\]\([^)]*\)", lambda m: m[1] or "", heading)
        anchors.add(re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-"))  # GitHub
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        anchors.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_text).strip().lower()))  # MkDocs
    return anchors


def _tail(text: str, keep: int = 8000) -> str:
    failed = [line for line in text.splitlines() if line.startswith("FAILED ")]
    head = (failed[-1] + "\n") if failed else ""
    return head + (text if len(text) <= keep else "...\n" + text[-keep:])
