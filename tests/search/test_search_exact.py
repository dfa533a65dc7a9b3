"""Exact scoring over float16 segments in float32 chunks, and top-k, against a float64 computation."""
import numpy as np
import pytest
import torch

from clipforge.search import exact


@pytest.fixture(params=[1, 2, 5], ids=lambda n: f"{n}-threads")
def torch_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_chunked_scores_and_top_k_equal_a_float64_computation(monkeypatch, torch_threads):
    # chunks that straddle nothing, segments of odd sizes, and worker ranges that cut segments
    monkeypatch.setattr(exact, "CHUNK_ROWS", 7)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((53, 24))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    segments = [vectors[:20], vectors[20:21], vectors[21:]]
    queries = rng.standard_normal((3, 24)).astype(np.float32)
    expected = vectors.astype(np.float64) @ queries.T.astype(np.float64)
    found = exact.scores(segments, queries)
    assert found.dtype == np.float32 and found.shape == (53, 3)
    assert torch.get_num_threads() == torch_threads  # the scan's single-thread setting is undone
    np.testing.assert_allclose(found, expected, atol=1e-5)
    positions, best = exact.top_k(found[:, 1], 10)
    assert positions.tolist() == np.argsort(-expected[:, 1], kind="stable")[:10].tolist()
    np.testing.assert_allclose(best, expected[positions, 1], atol=1e-5)
    assert exact.top_k(found[:, 0], 100)[0].tolist() == np.argsort(-found[:, 0], kind="stable").tolist()


def test_worker_ranges_cover_every_row_once():
    segments = [np.zeros((n, 2)) for n in (5, 0, 1, 12)]
    placed = [(s, first) for s, first in zip(segments, (100, 105, 105, 106))]  # the output rows they fill
    for workers in (1, 2, 3, 7):
        parts = exact._split(placed, workers)
        starts = sorted((first, first + len(rows)) for part in parts for rows, first in part)
        assert starts[0][0] == 100 and starts[-1][1] == 118
        assert all(a[1] == b[0] for a, b in zip(starts, starts[1:]))
        lengths = [sum(len(rows) for rows, _ in part) for part in parts]
        assert max(lengths) - min(lengths) <= 1


def test_float32_copies_score_as_the_float16_rows_within_their_budget(monkeypatch, torch_threads):
    monkeypatch.setattr(exact, "CHUNK_ROWS", 7)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((40, 8)).astype(np.float16)
    segments = [vectors[:16], vectors[16:32], vectors[32:]]
    identities = [("a", 16), ("b", 16), ("c", 8)]
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    copies = exact.Float32Copies(budget_mib=(16 + 16) * 8 * 4 / 2**20)  # room for the first two segments
    mixed = copies.apply("images", segments, identities)
    assert [s.dtype for s in mixed] == [np.float32, np.float32, np.float16] and copies.nbytes == 32 * 8 * 4
    np.testing.assert_array_equal(mixed[1], vectors[16:32].astype(np.float32))
    np.testing.assert_allclose(exact.scores(mixed, queries), exact.scores(segments, queries), rtol=1e-6, atol=1e-6)
    again = copies.apply("images", segments, identities)
    assert again[0] is mixed[0] and again[1] is mixed[1]  # kept while the identity is the same
    grown = copies.apply("images", segments, [("a", 16), ("b2", 16), ("c", 8)])
    assert grown[0] is mixed[0] and grown[1] is not mixed[1]
    assert copies.apply("captions", segments, identities)[0].dtype == np.float16  # the budget is shared
    with pytest.raises(ValueError, match="at least 0 MiB"):
        exact.Float32Copies(-1)
