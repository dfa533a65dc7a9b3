"""Fixtures of the page tests in this folder."""
import pytest


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through Playwright, for one test module (``served.launch_chromium``)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need playwright (the test extra)")
    from served import launch_chromium
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()
