"""The search page in headless Chromium (Playwright): a typed query shows thumbnails, an uploaded or dropped
image searches by it, a click or the keyboard searches for more like a result, infinite scroll, and a
reloaded URL gives the same results."""
import base64
import os

import pytest

httpx = pytest.importorskip("httpx", reason="the page tests need the test extra (httpx)")
pytest.importorskip("playwright.sync_api", reason="the page tests need playwright (the test extra)")

from served import guarded_page, needs_chromium  # noqa: E402

pytestmark = needs_chromium
PAGE_SIZE = 40  # app.js's PAGE_SIZE


@pytest.fixture
def page(browser, search_server):
    with guarded_page(browser, search_server, height=800) as page:
        yield page


def _api_ids(search_server, body):
    response = httpx.post(f"{search_server}/api/search", json={"top_k": PAGE_SIZE, **body}, timeout=60)
    return [r["id"] for r in response.json()["results"]]


def _shown_ids(page):
    return [int(i) for i in page.locator(".result").evaluate_all("links => links.map(a => a.dataset.id)")]


def _wait_for_results(page, first_id=None):
    page.wait_for_function("() => document.querySelectorAll('.result').length > 0 && "
                           "!document.getElementById('status').textContent.startsWith('Search')")
    if first_id is not None:
        page.wait_for_function(f"() => document.querySelector('.result')?.dataset.id === '{first_id}'")
    page.wait_for_function("() => [...document.querySelectorAll('.result img')].slice(0, 6)"
                           ".every(img => img.complete && img.naturalWidth > 0)")


@pytest.mark.slow
def test_typed_query_shows_thumbnails_and_survives_a_reload(page, search_server, tmp_path):
    page.goto("/")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    _wait_for_results(page)
    expected = _api_ids(search_server, {"query": "a red circle"})
    assert _shown_ids(page) == expected
    assert "q=a+red+circle" in page.url
    assert page.locator("#token-form").is_hidden() and page.locator("#load-more").is_visible()
    scores = page.locator(".result .score").all_inner_texts()
    assert len(scores) == PAGE_SIZE and all(float(s) <= 1 for s in scores)
    page.screenshot(path=os.environ.get("CLIPFORGE_SCREENSHOT", str(tmp_path / "search_page.png")))
    page.reload()
    _wait_for_results(page)
    assert _shown_ids(page) == expected and page.input_value("#q") == "a red circle"


@pytest.mark.slow
def test_click_a_result_for_more_like_it_and_back(page, search_server):
    page.goto("/?q=" + "a blue square".replace(" ", "+"))
    _wait_for_results(page)
    before = _shown_ids(page)
    third = before[2]
    page.locator(".result").nth(2).click()
    _wait_for_results(page, first_id=third)
    assert f"q=id%3A{third}" in page.url
    assert _shown_ids(page) == _api_ids(search_server, {"query": f"id:{third}"})
    page.reload()
    _wait_for_results(page, first_id=third)
    assert page.input_value("#q") == f"id:{third}"
    page.go_back()
    page.wait_for_function(f"() => document.querySelector('.result')?.dataset.id === '{before[0]}'")
    assert _shown_ids(page) == before


def test_keyboard_only(page, search_server):
    page.goto("/")
    page.keyboard.press("/")
    page.keyboard.type("a green star")
    page.keyboard.press("Enter")
    _wait_for_results(page)
    shown = _shown_ids(page)
    page.locator(".result").first.focus()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.id") == str(shown[1])
    page.keyboard.press("Enter")
    _wait_for_results(page, first_id=shown[1])
    assert _shown_ids(page) == _api_ids(search_server, {"query": f"id:{shown[1]}"})


@pytest.mark.slow
def test_upload_and_drop_an_image(page, search_server, search_photos):
    photo = search_photos / "a" / "00007.jpg"
    page.goto("/")
    page.set_input_files("#image-input", str(photo))
    _wait_for_results(page)
    shown = _shown_ids(page)
    assert page.locator(".result").first.get_attribute("title").startswith(str(photo))
    assert "image=" in page.url and page.locator("#query-image").is_visible()
    page.reload()
    _wait_for_results(page)
    assert _shown_ids(page) == shown
    page.goto("/")
    data = base64.b64encode((search_photos / "b" / "00030.jpg").read_bytes()).decode()
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
        document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
    }""", data)
    page.wait_for_function("() => location.search.startsWith('?image=')")
    _wait_for_results(page)
    assert page.locator(".result").first.get_attribute("title").startswith(str(search_photos / "b" / "00030.jpg"))


@pytest.mark.slow
def test_infinite_scroll_loads_every_result(page):
    page.goto("/?q=a+shape")
    _wait_for_results(page)
    assert page.locator(".result").count() == PAGE_SIZE
    page.mouse.wheel(0, 20000)
    page.wait_for_function("() => document.querySelectorAll('.result').length === 57")
    ids = _shown_ids(page)
    assert len(set(ids)) == 57
    assert page.locator("#load-more").is_hidden()


@pytest.mark.slow
def test_date_range_and_order_controls_filter_through_the_api(page, search_server):
    body = {"query": "a red circle"}
    first = httpx.post(f"{search_server}/api/search", json={"top_k": 1, **body}, timeout=60).json()["results"][0]
    day = first["captured"][:10]  # the generated photos carry no EXIF date: their mtime, today
    page.goto("/?q=a+red+circle")
    _wait_for_results(page)
    assert page.locator(".result .date").first.inner_text() == day
    page.select_option("#sort", "date")
    page.wait_for_url("**sort=date**")
    _wait_for_results(page)
    assert _shown_ids(page) == _api_ids(search_server, {**body, "sort": "date"})
    page.fill("#from", day)
    page.dispatch_event("#from", "change")
    page.wait_for_url(f"**from={day}**")
    _wait_for_results(page)
    assert _shown_ids(page) == _api_ids(search_server, {**body, "sort": "date", "after": day})
    page.fill("#until", "2000-01-01")
    page.fill("#from", "")
    page.dispatch_event("#until", "change")
    page.wait_for_function("() => document.getElementById('status').textContent === 'No results'")
    assert _shown_ids(page) == [] and "until=2000-01-01" in page.url
    page.reload()  # the controls come back from the URL
    page.wait_for_function("() => document.getElementById('status').textContent === 'No results'")
    assert page.input_value("#until") == "2000-01-01" and page.input_value("#sort") == "date"


@pytest.fixture(scope="module")
def tagged_server(tmp_path_factory, search_photos, trained_tiny_model):
    """A service over an index of the search photos tagged with colour and shape labels."""
    from clipforge.search import Index
    from clipforge.serve.server import start_child
    folder = tmp_path_factory.mktemp("tagged") / "index"
    Index.build(folder, [str(search_photos)], model=str(trained_tiny_model), progress=False, workers=0).close()
    with Index.open(folder) as index:
        index.tag(["red", "green", "blue", "circle", "square", "triangle"], threshold=0.5, top=2)
    process, base = start_child(folder)
    yield base
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_results_tags_show_and_filter_when_clicked(browser, tagged_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=tagged_server)
    page = context.new_page()
    page.goto("/?q=a+photo")
    _wait_for_results(page)
    chips = page.locator(".tag")
    assert chips.count() > 0
    label = chips.first.inner_text()
    api = httpx.post(f"{tagged_server}/api/search", json={"query": "a photo", "top_k": PAGE_SIZE}, timeout=60).json()
    shown = [[c for c in li.locator(".tag").all_inner_texts()] for li in page.locator("#results > li").all()]
    assert shown == [r["tags"] for r in api["results"]]
    chips.first.click()
    page.wait_for_url(f"**tag%3A{label.replace(' ', '_')}**")
    _wait_for_results(page)
    expected = _api_ids(tagged_server, {"query": f"a photo tag:{label.replace(' ', '_')}"})
    assert _shown_ids(page) == expected and expected
    shown = [li.locator(".tag").all_inner_texts() for li in page.locator("#results > li").all()]
    assert all(label in tags for tags in shown), (label, shown)
    context.close()


@pytest.mark.slow
def test_a_video_result_plays_from_its_time(browser, tmp_path):
    pytest.importorskip("av", reason="videos need the video extra (PyAV)")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data_layer"))
    from video_files import BLUE, GREEN, RED, video

    from clipforge.search import Index
    from clipforge.serve.server import start_child
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "clip.webm").write_bytes(video([(3, RED), (4, BLUE), (3, GREEN)], suffix=".webm"))
    Index.build(tmp_path / "index", [photos], model="tiny-vit", random_init=True, workers=0, progress=False).close()
    with Index.open(tmp_path / "index") as index:
        frame = next(index.item(i) for i in index.ids() if index.item(i).time == 5.0)
    process, base = start_child(tmp_path / "index", "--device", "cpu")
    context = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=base)
    try:
        page = context.new_page()
        page.goto(f"/?q=id%3A{frame.id}")
        _wait_for_results(page, frame.id)
        play = page.locator(f'.play[data-id="{frame.id}"]')
        assert play.inner_text() == "▶ 00:05"
        play.click()
        page.wait_for_function("() => { const v = document.getElementById('player-video');"
                               " return document.getElementById('player').open && v.readyState >= 1; }")
        page.wait_for_function("() => Math.abs(document.getElementById('player-video').currentTime - 5) < 0.6")
        assert page.locator("#player-video").evaluate("v => v.src").endswith(f"/api/items/{frame.id}/video#t=5")
        ranged = httpx.get(f"{base}/api/items/{frame.id}/video", headers={"Range": "bytes=0-99"}, timeout=60)
        assert ranged.status_code == 206 and len(ranged.content) == 100  # seeking needs byte ranges
    finally:
        context.close()
        process.terminate()
        process.wait(timeout=30)
