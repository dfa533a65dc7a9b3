"""GET /api/duplicates over HTTP on 127.0.0.1, on both stores: the groups ``find_duplicates`` gives with each
file's thumbnail URL, the threshold checked (422), answers kept per index size and threshold, the token."""
import pytest

httpx = pytest.importorskip("httpx", reason="the service tests need the test extra (httpx)")
pytest.importorskip("fastapi", reason="the service tests need the serve extra (fastapi, uvicorn)")
pytest.importorskip("pyarrow", reason="the library is indexed from an embeddings folder, which needs pyarrow")
from planted_duplicates import library_index, listing
from served import served

from clipforge.search.duplicates import DEFAULT_THRESHOLD, find_duplicates
from clipforge.serve import ServeOptions, create_app


@pytest.fixture
def library(index_at, tmp_path, one_thread):
    (tmp_path / "work").mkdir()
    index = library_index(tmp_path / "photos", index_at, tmp_path / "work")
    yield index, tmp_path
    index.close()


def _expected(index, threshold):
    groups = [g.to_dict() for g in find_duplicates(index, threshold)]
    for group in groups:
        for member in group["members"]:
            member["thumbnail_url"] = f"/thumbnails/{member['id']}"
    return {"threshold": threshold, "items": len(index), "groups": groups}


@pytest.mark.slow
def test_groups_thresholds_and_kept_answers(library, monkeypatch):
    index, tmp_path = library
    import clipforge.serve.duplicates as route
    calls = []
    monkeypatch.setattr(route, "find_duplicates", lambda *a: calls.append(a[1:]) or find_duplicates(*a))
    before = listing(tmp_path / "photos")
    app = create_app(index, ServeOptions(cache_dir=str(tmp_path / "thumbnails")))
    with served(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        answer = client.get("/api/duplicates")
        assert answer.status_code == 200 and answer.json() == _expected(index, DEFAULT_THRESHOLD)
        assert len(answer.json()["groups"]) == 3
        assert client.get("/api/duplicates", params={"threshold": DEFAULT_THRESHOLD}).json() == answer.json()
        strict = client.get("/api/duplicates", params={"threshold": 0.999}).json()
        assert strict == _expected(index, 0.999) and [g["kind"] for g in strict["groups"]] == ["exact"]
        assert calls == [(DEFAULT_THRESHOLD,), (0.999,)]  # the repeated question was answered from memory
        keeper = answer.json()["groups"][0]["members"][0]
        thumbnail = client.get(keeper["thumbnail_url"])
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        for bad in ("0", "-1", "1.5", "high"):
            refused = client.get("/api/duplicates", params={"threshold": bad})
            assert refused.status_code == 422 and "threshold" in refused.json()["error"]
        assert "/api/duplicates" in client.get("/openapi.json").json()["paths"]
    assert listing(tmp_path / "photos") == before


@pytest.mark.slow
def test_the_token_guards_the_route(library):
    index, tmp_path = library
    app = create_app(index, ServeOptions(token="s3cret", cache_dir=str(tmp_path / "thumbnails")))
    with served(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/api/duplicates").status_code == 401
        good = client.get("/api/duplicates", headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200 and len(good.json()["groups"]) == 3


def test_answers_are_kept_per_index_size_and_threshold(monkeypatch):
    import clipforge.serve.duplicates as route

    class Growing:
        size = 10

        def __len__(self):
            return self.size
    calls = []
    monkeypatch.setattr(route, "find_duplicates", lambda index, threshold: calls.append((len(index), threshold)) or [])
    index = Growing()
    answers = route.DuplicateAnswers(index)
    for threshold in (0.94, 0.94, 0.97, 0.94):
        assert answers.get(threshold) == {"threshold": threshold, "items": 10, "groups": []}
    index.size = 11  # an update added an item: asked again, computed again
    answers.get(0.94)
    for threshold in (0.5, 0.6, 0.7, 0.8):  # only the latest KEPT_ANSWERS stay
        answers.get(threshold)
    answers.get(0.94)
    assert calls == [(10, 0.94), (10, 0.97), (11, 0.94), (11, 0.5), (11, 0.6), (11, 0.7), (11, 0.8), (11, 0.94)]
