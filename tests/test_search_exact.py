"""Exact scoring over float16 segments in float32 chunks, and top-k, against a float64 computation."""
import numpy as np

from clipforge.search import exact


def test_chunked_scores_and_top_k_equal_a_float64_computation(monkeypatch):
    monkeypatch.setattr(exact, "CHUNK_ROWS", 7)  # chunks that straddle nothing and segments of odd sizes
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((53, 24))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    segments = [vectors[:20], vectors[20:21], vectors[21:]]
    queries = rng.standard_normal((3, 24)).astype(np.float32)
    expected = vectors.astype(np.float64) @ queries.T.astype(np.float64)
    found = exact.scores(segments, queries)
    assert found.dtype == np.float32 and found.shape == (53, 3)
    np.testing.assert_allclose(found, expected, atol=1e-5)
    positions, best = exact.top_k(found[:, 1], 10)
    assert positions.tolist() == np.argsort(-expected[:, 1], kind="stable")[:10].tolist()
    np.testing.assert_allclose(best, expected[positions, 1], atol=1e-5)
    assert exact.top_k(found[:, 0], 100)[0].tolist() == np.argsort(-found[:, 0], kind="stable").tolist()
