"""The approximate index (faiss, an extra): its recorded recall@10 is what an independent count against exact
search gives, it reaches the target on clustered vectors, and searches use it only while it is current."""
import json

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from clipforge.search import Index, approximate  # noqa: E402

from test_search_index import write_folder  # noqa: E402


def _clustered(n, dim, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim))
    vectors = centres[rng.integers(0, 64, n)] + spread * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_recorded_recall_is_the_measured_recall(tmp_path, one_thread):
    vectors = _clustered(20_000, 64, spread=1.2)  # loose clusters: 5 of the 141 cells reach the target
    ids = np.arange(100, 100 + len(vectors))
    info = approximate.build(tmp_path, ids, vectors, rows_used=len(vectors))
    assert info["recall@10"] >= approximate.TARGET_RECALL and info["nprobe"] < info["cells"]
    searcher, stored_ids = approximate.load(tmp_path, info)
    np.testing.assert_array_equal(stored_ids, ids)
    queries = approximate.sample_queries(vectors, approximate.SAMPLED_QUERIES)
    exact_top = np.argsort(-(vectors @ queries.T), axis=0)[:10].T  # (Q, 10), independent of the library
    found = searcher.search(queries, 10)[1]
    recall = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact_top, found)])
    assert info["recall@10"] == pytest.approx(recall, abs=1e-4)
    # the fewest cells to within an eighth: probing that much fewer misses the target (the build doubles, then
    # bisects back; a doubling alone could stop at up to twice the cells needed)
    assert info["nprobe"] > 1
    searcher.nprobe = info["nprobe"] - max(1, info["nprobe"] // 8)
    found = searcher.search(queries, 10)[1]
    assert np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact_top, found)]) < approximate.TARGET_RECALL


def test_index_uses_a_current_approximate_index_only(tmp_path, one_thread):
    photos = tmp_path / "photos"
    write_folder(photos, 10)
    index = Index.build(tmp_path / "idx", [photos], model="tiny-vit", random_init=True, workers=0, progress=False,
                        approximate="always")
    info = json.loads((tmp_path / "idx" / "config.json").read_text())["approximate"]
    assert info["items"] == 10 and info["recall@10"] == 1.0
    exact = index.search("a blue photo", top_k=5, approximate=False)
    close = index.search("a blue photo", top_k=5, approximate=True)
    assert [r.id for r in close] == [r.id for r in exact]
    np.testing.assert_allclose([r.score for r in close], [r.score for r in exact], atol=1e-3)
    write_folder(photos / "more", 2, start=30)
    updated = Index.build(tmp_path / "idx", [photos], model="tiny-vit", random_init=True, workers=0, progress=False,
                          approximate="never")
    assert updated.config["approximate"] is None and not (tmp_path / "idx" / approximate.FILE).exists()
    with pytest.raises(ValueError, match="no current approximate index"):
        updated.search("a blue photo", approximate=True)
    assert len(updated.search("a blue photo", top_k=20)) == 12


def test_auto_builds_the_approximate_index_once_the_index_passes_the_threshold(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(approximate, "AUTO_THRESHOLD", 12)
    photos = tmp_path / "photos"
    write_folder(photos, 10)
    small = Index.build(tmp_path / "idx", [photos], model="tiny-vit", random_init=True, workers=0, progress=False)  # "auto"
    assert small.config.get("approximate") is None and not (tmp_path / "idx" / approximate.FILE).exists()
    small.close()
    write_folder(photos / "more", 2, start=30)
    grown = Index.build(tmp_path / "idx", [photos], model="tiny-vit", random_init=True, workers=0, progress=False)
    info = json.loads((tmp_path / "idx" / "config.json").read_text())["approximate"]
    assert info["items"] == 12 and (tmp_path / "idx" / approximate.FILE).exists()
    exact = grown.search("a blue photo", top_k=12, approximate=False)
    assert [r.id for r in grown.search("a blue photo", top_k=12, approximate=True)] == [r.id for r in exact]
