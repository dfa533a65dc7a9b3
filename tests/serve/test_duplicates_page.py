"""The page's "Similar photos" view in headless Chromium (Playwright): ?view=duplicates shows the groups of
GET /api/duplicates with their thumbnails and the suggested keeper marked, the header's link opens it, a search
leaves it, and the browser's back button returns to it."""
import os

import pytest

httpx = pytest.importorskip("httpx", reason="the page tests need the test extra (httpx)")
pytest.importorskip("playwright.sync_api", reason="the page tests need playwright (the test extra)")
pytest.importorskip("pyarrow", reason="the library is indexed from an embeddings folder, which needs pyarrow")
from planted_duplicates import library_index
from served import guarded_page, needs_chromium, served

from clipforge.serve import ServeOptions, create_app

pytestmark = [pytest.mark.slow, needs_chromium]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The small library (tests/planted_duplicates.py) served in this process; yields the base URL."""
    import torch
    root = tmp_path_factory.mktemp("duplicates_page")
    (root / "work").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        index = library_index(root / "photos", root / "index", root / "work")
    finally:
        torch.set_num_threads(threads)
    with served(create_app(index, ServeOptions(cache_dir=str(root / "thumbnails")))) as base:
        yield base
    index.close()


@pytest.fixture
def page(browser, service):
    with guarded_page(browser, service, height=900) as page:
        yield page


def _wait_for_groups(page):
    page.wait_for_function("() => document.querySelectorAll('.duplicate-group').length > 0")
    page.wait_for_function("() => [...document.querySelectorAll('.duplicate img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")


def _shown(page):
    return page.locator(".duplicate-group").evaluate_all(
        "groups => groups.map(g => [...g.querySelectorAll('.duplicate')].map(a => "
        "[Number(a.dataset.id), a.classList.contains('keeper'), a.querySelector('.note').textContent]))")


def test_the_view_shows_the_groups_with_the_keeper_marked(page, service, tmp_path):
    api = httpx.get(f"{service}/api/duplicates", timeout=60).json()
    page.goto("/?view=duplicates")
    _wait_for_groups(page)
    shown = _shown(page)
    assert [[i for i, _, _ in group] for group in shown] == [[m["id"] for m in g["members"]] for g in api["groups"]]
    assert [[keeper for _, keeper, _ in group] for group in shown] == [[True, False, False]] * 3
    assert all(group[0][2] == "Keep" for group in shown)
    notes = [note for group in shown for _, keeper, note in group if not keeper]
    assert "same bytes" in notes and all(n == "same bytes" or n.startswith("cosine 0.") for n in notes)
    assert "3 groups of similar photos" in page.inner_text("#status")
    assert "400×300" in page.locator(".duplicate.keeper").first.inner_text() or \
           "400×300" in page.inner_text("#duplicate-groups")
    page.screenshot(path=os.environ.get("CLIPFORGE_SCREENSHOT", str(tmp_path / "duplicates_page.png")),
                    full_page=True)
    page.goto("/?view=duplicates&threshold=0.999")
    page.wait_for_function("() => document.querySelectorAll('.duplicate-group').length === 1")
    assert page.locator(".duplicate-group h2").inner_text().startswith("Exact copies: 2 files")


def test_the_link_opens_the_view_and_a_search_leaves_it(page):
    page.goto("/")
    assert page.locator("#duplicate-groups").is_hidden()
    page.click("#similar-photos")
    _wait_for_groups(page)
    assert page.url.endswith("?view=duplicates")
    page.fill("#q", "id:1")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.result').length > 0")
    assert page.locator("#duplicate-groups").is_hidden()
    page.go_back()
    _wait_for_groups(page)
    assert page.locator("#duplicate-groups").is_visible() and page.locator(".result").count() == 0
