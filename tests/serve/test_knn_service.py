"""clip-retrieval's API on clipforge serve: clip-retrieval's own ``ClipClient`` (text, image, vector, both
modalities, dedup) gets the ids and scores ``Index.search`` gives for the same query, ``/metadata`` and
``/indices-list`` answer as clip-retrieval's back end does, bad requests get JSON 4xx, the token and CORS
rules hold, and clip-retrieval's web front end (clip-front, shipped in its wheel) shows the results in
headless Chromium."""
import base64
import csv
import functools
import http.server
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the service tests need the test extra (httpx)")
pytest.importorskip("fastapi", reason="the service tests need the serve extra (fastapi, uvicorn)")
pytest.importorskip("requests", reason="clip-retrieval's ClipClient needs requests (the test extra)")
from PIL import Image  # noqa: E402
from served import NO_CHROMIUM, chromium_executable, launch_chromium  # noqa: E402

from clipforge.search import Query  # noqa: E402

SCORE_TOLERANCE = 1e-4  # the service and the test encode the same query with the same model, in two processes
DEDUP_COSINE = 0.94  # clip-retrieval's duplicate threshold, which the service applies for deduplicate=true


def _clip_retrieval_folder() -> Path:
    spec = importlib.util.find_spec("clip_retrieval")  # finds the package without running its __init__
    if spec is None:
        pytest.skip("needs clip-retrieval, installed without its dependencies: "
                    "pip install --no-deps clip-retrieval==2.45.0 (make install does)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def clip_client():
    """clip-retrieval's ``clip_client`` module, loaded from its file: the package's ``__init__`` imports its
    whole back end (torch, torchvision, faiss, flask, pandas, h5py, ...), and ``ClipClient`` needs only
    ``requests``."""
    path = _clip_retrieval_folder() / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def captioned_index(tmp_path_factory, search_photos, trained_tiny_model):
    """``search_photos`` indexed from a CSV that gives the 28 photos of ``a/`` their shape captions and the
    29 of ``b/`` none, so that both of clip-retrieval's modalities have vectors to rank."""
    from clipforge.data import ShapesDataset
    from clipforge.search import Index
    folder = tmp_path_factory.mktemp("knn")
    shapes = ShapesDataset(56, seed=3, image_size=96)  # search_photos's images and their captions
    with open(folder / "photos.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        for path in sorted(search_photos.rglob("*.jpg")):
            captioned = path.parent.name == "a"
            writer.writerow([str(path), shapes[int(path.stem)][1] if captioned else ""])
    Index.build(folder / "idx", [str(folder / "photos.csv")], model=str(trained_tiny_model), workers=0,
                progress=False)
    return folder / "idx"


@pytest.fixture(scope="module")
def index(captioned_index):
    from clipforge.search import Index
    with Index.open(captioned_index) as opened:
        yield opened


@pytest.fixture(scope="module")
def server(captioned_index, tmp_path_factory):
    """``clipforge serve`` over the captioned index, with the small upload limits of ``search_server``."""
    from clipforge.serve.server import start_child
    log = tmp_path_factory.mktemp("knn_serve") / "stderr.txt"
    with open(log, "w") as stderr:
        process, base = start_child(captioned_index, "--max-upload-mb", "1", "--max-pixels", "4000000",
                                    stderr=stderr)
    yield base
    process.terminate()
    process.wait(timeout=30)


def _client(clip_client, server, **options):
    return clip_client.ClipClient(f"{server}/knn-service", indice_name="clipforge", **options)


def _text(text):
    return Query.from_terms([("text", text)])  # the text as it is, not the command line's query syntax


def _expected(index, query, top_k, **options):
    """``Index.search`` for the same query: (ids, scores)."""
    found = index.search(query, top_k=top_k, **options)
    return [r.id for r in found], [r.score for r in found]


def _check(results, index, query, top_k, **options):
    ids, scores = _expected(index, query, top_k, **options)
    assert [r["id"] for r in results] == ids
    assert [r["similarity"] for r in results] == pytest.approx(scores, abs=SCORE_TOLERANCE)


def test_text_query_gives_index_search_results(clip_client, server, index):
    results = _client(clip_client, server, num_images=12, deduplicate=False).query(text="a red circle")
    _check(results, index, _text("a red circle"), 12)
    for r in results:
        item = index.item(r["id"])
        assert r["url"] == f"{server}/thumbnails/{r['id']}" and r["path"] == item.location
        assert (r["width"], r["height"]) == (96, 96)
        assert r.get("caption") == item.caption and ("caption" in r) == (item.caption is not None)
    thumbnail = httpx.get(results[0]["url"], timeout=60)
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (96, 96)


def test_image_query_with_and_without_deduplication(clip_client, server, index, search_photos):
    photo = search_photos / "a" / "00000.jpg"  # b/copy.jpg holds the same bytes
    query = Query.from_terms([("bytes", photo.read_bytes())])
    plain = _client(clip_client, server, num_images=6, deduplicate=False).query(image=str(photo))
    _check(plain, index, query, 6)
    twins = {str(photo), str(search_photos / "b" / "copy.jpg")}
    assert {r["path"] for r in plain[:2]} == twins and plain[1]["similarity"] == pytest.approx(1, abs=2e-3)
    deduped = _client(clip_client, server, num_images=6).query(image=str(photo))  # ClipClient's default: dedup
    _check(deduped, index, query, 6, dedup=DEDUP_COSINE)
    assert len({r["path"] for r in deduped} & twins) == 1


def test_text_modality_ranks_the_caption_vectors(clip_client, server, index, search_photos):
    results = _client(clip_client, server, num_images=10, deduplicate=False,
                      modality=clip_client.Modality.TEXT).query(text="a blue square")
    _check(results, index, _text("a blue square"), 10, captions=True)
    assert all(r["path"].startswith(str(search_photos / "a")) and r["caption"] for r in results)
    all_captioned = _client(clip_client, server, num_images=100, deduplicate=False,
                            modality=clip_client.Modality.TEXT).query(text="a blue square")
    assert len(all_captioned) == 28  # only b/ has no captions


def test_embedding_query_is_normalised(clip_client, server, index):
    vector = index.encode_query(Query.from_terms([("id", 3)])).astype(np.float64)
    results = _client(clip_client, server, num_images=5, deduplicate=False).query(
        embedding_input=(3.0 * vector).tolist())
    _check(results, index, (vector / np.linalg.norm(vector)).astype(np.float32), 5)
    assert results[0]["id"] == 3 and results[0]["similarity"] == pytest.approx(1, abs=2e-3)


def test_ids_beyond_num_images_and_the_metadata_route(server, index):
    body = {"text": "a green star", "modality": "image", "num_images": 3, "num_result_ids": 9,
            "indice_name": "clipforge", "deduplicate": False}
    results = httpx.post(f"{server}/knn-service", content=json.dumps(body), timeout=60).json()
    _check(results, index, _text("a green star"), 9)
    assert all("url" in r for r in results[:3]) and all(set(r) == {"id", "similarity"} for r in results[3:])
    ids = [r["id"] for r in results]
    metadata = httpx.post(f"{server}/metadata", content=json.dumps({"ids": ids, "indice_name": "clipforge"}),
                          timeout=60).json()
    assert [m["id"] for m in metadata] == ids
    for full, meta in zip(results[:3], metadata[:3]):
        assert {"id": full["id"], "similarity": full["similarity"], **meta["metadata"]} == full
    assert httpx.post(f"{server}/metadata", content='{"ids": [], "indice_name": "clipforge"}').json() == []
    assert httpx.get(f"{server}/indices-list").json() == ["clipforge"]


def test_a_result_url_searches_by_that_item_and_no_other_url_is_fetched(server, index):
    body = {"image_url": f"{server}/thumbnails/5", "modality": "image", "num_images": 4, "indice_name": "clipforge"}
    results = httpx.post(f"{server}/knn-service", json=body, timeout=60).json()
    _check(results, index, "id:5", 4)
    assert results[0]["id"] == 5
    for url in ("http://example.com/cat.jpg", f"{server}/thumbnails/5/../../etc/passwd", "file:///etc/passwd",
                f"{server.replace('127.0.0.1', 'localhost')}/thumbnails/5"):
        refused = httpx.post(f"{server}/knn-service", json={**body, "image_url": url}, timeout=60)
        assert refused.status_code == 400 and "fetches no URL" in refused.json()["error"], url


@pytest.mark.parametrize("body, status, says", [
    ({"modality": "image", "num_images": 3}, 400, "exactly one of"),
    ({"text": "red", "image": "aGVsbG8=", "num_images": 3}, 400, "got text, image"),
    ({"text": "red", "num_images": 3, "use_mclip": True}, 400, "multilingual"),
    ({"image": "not base64!", "num_images": 3}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"not an image").decode(), "num_images": 3}, 400, "query image"),
    ({"embedding_input": [0.0] * 128, "num_images": 3}, 400, "not all zero"),  # tiny-vit: 128
    ({"embedding_input": [1.0, 2.0], "num_images": 3}, 400, "2 numbers"),
    ({"text": "red", "num_images": 3, "indice_name": "laion5B-H-14"}, 404, "'laion5B-H-14'"),
    ({"text": "red", "num_images": 0}, 422, "num_images"),
    ({"text": "red", "num_images": 3, "num_result_ids": 10_001}, 422, "num_result_ids"),
    ({"text": "red", "num_images": 3, "modality": "audio"}, 422, "modality"),
    ({"image_url": "http://127.0.0.1:1/thumbnails/99999", "num_images": 3}, 400, "fetches no URL"),
])
def test_bad_requests_get_json_errors(server, body, status, says):
    response = httpx.post(f"{server}/knn-service", content=json.dumps(body), timeout=60)
    assert (response.status_code, response.json()["status"]) == (status, status)
    assert says in response.json()["error"]


def test_malformed_unknown_and_oversized_requests(server):
    def error(response):
        return response.status_code, response.json()["status"]

    assert error(httpx.post(f"{server}/knn-service", content=b"{", timeout=60)) == (400, 400)
    assert error(httpx.post(f"{server}/knn-service", json=[1, 2], timeout=60)) == (422, 422)
    assert error(httpx.post(f"{server}/metadata", json={"ids": [99999]}, timeout=60)) == (404, 404)
    assert error(httpx.post(f"{server}/metadata", json={"ids": ["x"]}, timeout=60)) == (422, 422)
    assert error(httpx.get(f"{server}/knn-service", timeout=60)) == (405, 405)
    large = io.BytesIO()
    Image.new("RGB", (2100, 2100), "white").save(large, format="PNG")  # 4.4 megapixels, a few KiB
    over_pixels = {"image": base64.b64encode(large.getvalue()).decode(), "num_images": 3}
    assert error(httpx.post(f"{server}/knn-service", json=over_pixels, timeout=60)) == (413, 413)
    over_bytes = {"image": base64.b64encode(os.urandom(2 * 2**20)).decode(), "num_images": 3}
    assert error(httpx.post(f"{server}/knn-service", json=over_bytes, timeout=60)) == (413, 413)
    assert httpx.post(f"{server}/knn-service", json={"text": "red", "num_images": 1},
                      headers={"Host": "attacker.example"}, timeout=60).status_code == 421


def test_token_and_cors(captioned_index, tmp_path):
    from fastapi.testclient import TestClient

    from clipforge.search import Index
    from clipforge.serve import ServeOptions, create_app
    options = ServeOptions(token="s3cret", cache_dir=str(tmp_path), cors_origins=("https://front.example",))
    client = TestClient(create_app(Index.open(captioned_index), options), base_url="http://127.0.0.1:8000")
    good = {"Authorization": "Bearer s3cret"}
    body = json.dumps({"ids": [1], "indice_name": "clipforge"})
    for route, call in (("/indices-list", lambda **k: client.get("/indices-list", **k)),
                        ("/metadata", lambda **k: client.post("/metadata", content=body, **k)),
                        ("/knn-service", lambda **k: client.post("/knn-service", content=body, **k))):
        assert call().status_code == 401, route
    assert client.post("/metadata", content=body, headers=good).json()[0]["metadata"]["url"] == (
        "http://127.0.0.1:8000/thumbnails/1")
    for origin, allowed in (("http://localhost:1235", True), ("http://127.0.0.1:5000", True),
                            ("https://front.example", True), ("https://evil.example", False),
                            ("http://localhost.evil.example", False)):
        answer = client.get("/indices-list", headers={**good, "Origin": origin})
        assert answer.json() == ["clipforge"]
        assert answer.headers.get("access-control-allow-origin") == (origin if allowed else None), origin
        preflight = client.options("/knn-service", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                            "Access-Control-Request-Headers": "authorization"})
        assert (preflight.status_code == 200) == allowed, origin
    refused = client.get("/indices-list", headers={"Origin": "http://localhost:1235"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://localhost:1235"
    # the rest of the API stays readable by the service's own page only
    other = client.get("/api/items/1", headers={**good, "Origin": "http://localhost:1235"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_schema_describes_the_routes(server):
    schema = httpx.get(f"{server}/openapi.json", timeout=60).json()
    assert {"/knn-service", "/metadata", "/indices-list"} <= set(schema["paths"])
    knn = schema["paths"]["/knn-service"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "image", "embedding_input", "modality", "num_images", "indice_name", "deduplicate"} <= set(
        knn["properties"])


# ------------------------------------------------------------------------------------------ clip-front

@pytest.fixture(scope="module")
def front(loopback_http, server):
    """clip-front (the web page in clip-retrieval's wheel) served from another loopback port, as
    ``clip-retrieval front`` serves it, with its config naming the service as the default back end."""
    build = _clip_retrieval_folder().parent / "front" / "build"
    if not (build / "index.html").exists():
        pytest.skip(f"clip-retrieval's wheel has no front end at {build}")
    config = json.dumps({"defaultBackend": server, "defaultIndex": "", "urlColumn": "url"}).encode()

    class Front(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] != "/config.json":
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(config)))
            self.end_headers()
            self.wfile.write(config)

        def log_message(self, *args):
            pass

    return loopback_http(functools.partial(Front, directory=str(build)))


@pytest.fixture
def page(front, server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (the test extra)")
    if chromium_executable() is None:
        pytest.skip(NO_CHROMIUM)
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        outside, errors, failed = [], [], []
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith((front, server))
                      else (outside.append(route.request.url), route.abort()))
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load" not in m.text
                else None)  # failed loads are checked by their responses, below
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        yield page
        browser.close()
    assert not outside, f"the page reached outside the front end and the service: {outside}"
    assert not errors, f"errors on the page: {errors}"
    # clip-front's index.html names vendor/webcomponents-loader.js, which its wheel keeps elsewhere (a polyfill
    # that Chromium does not need): the one file allowed to be missing
    assert failed in ([], [f"404 {front}/vendor/webcomponents-loader.js"]), failed


def _shown(page, count: int) -> list[int]:
    """The item ids of the first ``count`` pictures clip-front shows, once they are shown and loaded."""
    page.wait_for_function(f"""() => {{
        const pics = [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')];
        return pics.length >= {count} && pics.slice(0, {count}).every(img => img.complete && img.naturalWidth > 0);
    }}""", timeout=60_000)
    sources = page.locator("clip-front img.pic").evaluate_all("pics => pics.map(img => img.src)")
    return [int(src.rsplit("/", 1)[1]) for src in sources]


def test_clip_front_searches_the_index(page, front, server, index):
    """clip-front with its own defaults (40 results with metadata, up to 3,000 ids, near-duplicates hidden),
    then without hiding near-duplicates (all 57: clip-front asks /metadata for those past 40 as the page
    fills), then searching by a result's picture."""
    deduped, _ = _expected(index, _text("a yellow ring"), 3000, dedup=DEDUP_COSINE)
    page.goto(f"{front}/?query=a+yellow+ring")
    assert _shown(page, len(deduped)) == deduped
    everything, _ = _expected(index, _text("a yellow ring"), 3000)
    page.locator("clip-front label", has_text="Hide (near) duplicate images").locator("input").click()
    assert len(everything) == 57 and _shown(page, 40) == everything[:40]
    page.mouse.wheel(0, 10_000)  # clip-front fetches the metadata of further results as the page scrolls
    assert _shown(page, 57) == everything
    page.locator("clip-front figure").nth(2).hover()  # shows the picture's search icon
    page.locator("clip-front img.subImageSearch").nth(2).click()  # the service searches by that item
    by_item, _ = _expected(index, Query.from_terms([("id", everything[2])]), 3000)
    page.wait_for_function(f"""() => document.location.search.includes('imageUrl=')
        && document.querySelector('clip-front').shadowRoot.querySelector('img.pic')?.src
           .endsWith('/thumbnails/{by_item[0]}')""")
    assert _shown(page, 40)[:40] == by_item[:40]
