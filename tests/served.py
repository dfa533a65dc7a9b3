"""What the service and page tests share: an app served by uvicorn in a thread on a free loopback port, and
Debian's chromium launched from Playwright as CI runs it (``playwright install`` cannot download here)."""
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
NO_CHROMIUM = ("the page tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run "
               "installs it)")


def chromium_executable() -> str | None:
    """Debian's chromium, else one on PATH, else None."""
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


needs_chromium = pytest.mark.skipif(chromium_executable() is None, reason=NO_CHROMIUM)


def launch_chromium(playwright):
    """A headless chromium from a running ``sync_playwright()``: the system's, sandbox, GPU and background
    networking off."""
    return playwright.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)


@contextmanager
def served(app):
    """``app`` served by uvicorn in a thread on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def guarded_page(browser, base: str, height: int = 800):
    """A page of a new browser context at ``base`` (1280 × ``height``) that may load nothing but ``base``;
    after the block, asserts that it tried nothing else and raised no script error."""
    context = browser.new_context(viewport={"width": 1280, "height": height}, base_url=base)
    page = context.new_page()
    outside = []
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                  else (outside.append(route.request.url), route.abort()))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not outside, f"the page reached outside the service: {outside}"
    assert not errors, f"script errors on the page: {errors}"
