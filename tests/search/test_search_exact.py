"""Exact scoring over float16 segments in float32 chunks, and top-k, against a float64 computation."""
import numpy as np
import pytest
import torch

from clipforge.search import exact, store


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


def _unit_rows(rng, n, d, clusters=None):
    rows = rng.standard_normal((n, d))
    if clusters:
        rows += 2 * rng.standard_normal((clusters, d))[rng.integers(0, clusters, n)]
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def test_int8_screen_bounds_every_row_error():
    """The bound of each row's approximate score holds for any unit query: dense, one-hot, constant, negated,
    and against rows that are one-hot, constant or repeated."""
    rng = np.random.default_rng(7)
    d = 64
    rows = np.concatenate([_unit_rows(rng, 3000, d, clusters=30), np.eye(d, dtype=np.float16),
                           np.full((3, d), 1 / np.sqrt(d), dtype=np.float16), _unit_rows(rng, 1, d).repeat(50, 0)])
    screen = exact.Int8Screen(rows)
    assert len(screen) == len(rows) and screen.nbytes == len(rows) * (d + 8)
    exact_rows = rows.astype(np.float64)
    queries = [np.eye(d)[3], np.full(d, 1 / np.sqrt(d)), -exact_rows[5], exact_rows[3001]]
    queries += [q / np.linalg.norm(q) for q in rng.standard_normal((40, d))]
    worst = 0.0
    for query in queries:
        approximate, bound = screen.scores(torch.tensor(query, dtype=torch.float32)[None])
        error = np.abs(approximate.numpy() - exact_rows @ query)
        assert (error <= bound.numpy()).all()
        worst = max(worst, float((error / bound.numpy()).max()))
    assert worst > 0.01  # the bound is not vacuous: errors come within two orders of it


@pytest.mark.parametrize("k", [1, 10, 100])
def test_screened_top_k_is_the_full_scans(k, torch_threads, monkeypatch):
    monkeypatch.setattr(store, "SEGMENT_ROWS", 2048)  # segments as the store lays them out, only smaller
    rng = np.random.default_rng(k)
    d = 64
    vectors = _unit_rows(rng, 5000, d, clusters=50)
    vectors[100:110] = vectors[7]  # exact ties, ranked by position
    segments = [vectors[:2048], vectors[2048:4096], vectors[4096:]]
    screens = [exact.Int8Screen(s) for s in segments]
    every = np.arange(len(vectors))
    subset = rng.permutation(len(vectors))[:3000]  # a filter's rows, in id order that is not row order
    for rows in (every, subset):
        for query in [vectors[7].astype(np.float32)] + list(rng.standard_normal((5, d)).astype(np.float32)):
            query /= np.linalg.norm(query)
            found = exact.screened_top(screens, segments, rows, query, k)
            assert found is not None
            positions, best = found
            reference = vectors[rows].astype(np.float64) @ query  # independent of the float32 scans
            assert len(set(positions.tolist())) == k
            np.testing.assert_allclose(best, reference[positions], atol=1e-5)
            np.testing.assert_allclose(best, np.sort(reference)[::-1][:k], atol=1e-5)
            assert (np.diff(best) <= 0).all()
            full = exact.scores(segments, query[None])[rows, 0]
            np.testing.assert_allclose(best, exact.top_k(full, k)[1], atol=1e-6)
        # the copies of row 7 score exactly alike here, so the first of them in ``rows`` comes first
        copies = np.flatnonzero(np.isin(rows, [7, *range(100, 110)]))
        query = vectors[7].astype(np.float32) / np.linalg.norm(vectors[7].astype(np.float32))
        positions, best = exact.screened_top(screens, segments, rows, query, min(k, len(copies)))
        np.testing.assert_array_equal(positions, copies[:len(positions)])


def test_screened_top_gives_way_where_it_cannot_rule_rows_out():
    rng = np.random.default_rng(3)
    vectors = _unit_rows(rng, 1, 32).repeat(400, 0)  # every row the same: every row may be in the top 10
    query = vectors[0].astype(np.float32)
    assert exact.screened_top([exact.Int8Screen(vectors)], [vectors], np.arange(400), query, 10) is None


def test_screens_share_the_budget_and_need_enough_rows(monkeypatch):
    rng = np.random.default_rng(4)
    vectors = _unit_rows(rng, 100, 8)
    segments, identities = [vectors[:64], vectors[64:]], [("a", 64), ("b", 36)]
    screen_size = 100 * (8 + 8)
    copies = exact.Float32Copies(budget_mib=screen_size / 2**20)
    assert copies.screens("images", segments, identities) is None  # under SCREEN_MIN_ROWS
    monkeypatch.setattr(exact, "SCREEN_MIN_ROWS", 50)
    made = copies.screens("images", segments, identities)
    assert [len(s) for s in made] == [64, 36] and copies.screen_nbytes == screen_size
    assert copies.screens("images", segments, identities)[0] is made[0]  # kept while the identity is the same
    assert copies.apply("images", segments, identities)[0].dtype == np.float16  # the screens took the budget
    assert copies.screens("captions", segments, identities) is None  # no room beside the images' screens


def test_a_service_index_with_screens_answers_as_a_plain_scan(monkeypatch, search_index, search_photos):
    """Index.search through the int8 screens (a service's in-RAM copies) gives the results and scores of the
    scan of the files, with filters, offsets and a score floor."""
    from clipforge.search import Index
    monkeypatch.setattr(exact, "SCREEN_MIN_ROWS", 0)
    monkeypatch.setattr(exact, "SCREEN_MAX_SHARE", 1.0)  # never give way: every search below goes through them
    used = []
    original = exact.screened_top
    monkeypatch.setattr(exact, "screened_top", lambda *a: used.append(1) or original(*a))
    with Index.open(search_index) as plain, Index.open(search_index, float32_mib=64) as screened:
        for query, options in [("a red circle", {}), ("a blue square", {"top_k": 5, "offset": 3}),
                               ("a green shape", {"folder": str(search_photos / "b")}),
                               ("a yellow star", {"min_score": 0.0, "top_k": 50}), ("id:3 - a red shape", {})]:
            a, b = plain.search(query, **options), screened.search(query, **options)
            assert len(a) == len(b) > 0
            np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-6)
            # the same items in the same order, but for equal scores (b/copy.jpg is a/00000.jpg's bytes)
            differ = [(x, y) for x, y in zip(a, b) if x.id != y.id]
            assert all(abs(x.score - y.score) < 1e-6 for x, y in differ) and len(differ) <= 2
        assert screened.store.screen_bytes == len(screened) * (screened.dim + 8)
        assert len(used) == 5
