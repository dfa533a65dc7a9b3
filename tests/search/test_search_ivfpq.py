"""The compressed approximate index (faiss IVF-PQ on disk, re-ranked exactly): its recorded recall@10 is what an
independent count against exact search gives, re-ranked scores are the exact scores, its lists built in
partitions and merged on disk equal lists filled in memory and are memory-mapped when searched, its parameters
fit --max-index-memory, "auto" chooses and keeps it as documented, and `clipforge index --approximate ivfpq` and
`clipforge search` use it end to end."""
import json
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from clipforge.cli import main  # noqa: E402
from clipforge.search import Index, approximate, ivfpq, store  # noqa: E402

from test_search_index import write_folder  # noqa: E402

DIM = 32


@pytest.fixture(scope="module", autouse=True)
def faiss_one_thread():
    """One OpenMP thread for faiss: on a small shared CPU its k-means is several times faster so."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 64 centres, as float16 stores them (float32 values)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, DIM))
    vectors = centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float16).astype(np.float32)


def _write_index(folder: Path, vectors: np.ndarray) -> None:
    """A folder index holding ``vectors`` (no model: searched by vector), or more of them appended, committed as
    the indexer commits: vectors first, then the rows that point at them; ids start at 1, one per row."""
    if store.read_config(folder) is None:
        folder.mkdir(parents=True, exist_ok=True)
        store.write_config(folder, {"format_version": store.FORMAT_VERSION, "segment_rows": store.SEGMENT_ROWS,
                                    "model": "synthetic", "weights_sha256": "", "dim": DIM, "preprocess": {}})
    db = store.connect(folder)
    first = store.next_row(db, "images")
    writer = store.SegmentWriter(folder, "images", DIM)
    writer.write(first, vectors.astype(np.float16))
    writer.close()
    with db:
        db.executemany("INSERT INTO items (id, source, path, key, size, mtime_ns, hash, width, height, row) "
                       "VALUES (?, 's', '/synthetic', ?, 0, 0, '', 0, 0, ?)",
                       [(first + i + 1, str(first + i), first + i) for i in range(len(vectors))])
        db.execute("INSERT OR REPLACE INTO rows VALUES ('images', ?)", (first + len(vectors),))
    db.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """20,000 clustered vectors in segments of 4,096 rows, the IVF-PQ lists built in partitions of 5,000 vectors
    filled 2,048 at a time, so that reading across segments and merging partitions are both exercised."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "SEGMENT_ROWS", 4096)
        patch.setattr(ivfpq, "PARTITION_ROWS", 5000)
        patch.setattr(ivfpq, "CHUNK_ROWS", 2048)
        folder = tmp_path_factory.mktemp("ivfpq") / "idx"
        vectors = _clustered(20_000)
        _write_index(folder, vectors)
        info = approximate.refresh(folder, "ivfpq")
        yield folder, vectors, info


def _searcher(folder: Path, info: dict):
    with store.connect(folder) as db:
        ids, rows = np.ascontiguousarray(store.int_columns(db, "SELECT id, row FROM items ORDER BY id").T)
    return approximate.load(folder, info, ids, rows)


@pytest.mark.parametrize("text, size", [("512MB", 512 * 2**20), ("4GB", 4 * 2**30), ("4G", 4 * 2**30),
                                        ("1.5GiB", int(1.5 * 2**30)), ("64 kb", 64 * 1024), ("1000000", 10**6)])
def test_sizes_parse_as_powers_of_1024(text, size):
    assert ivfpq.parse_size(text) == size


@pytest.mark.parametrize("text", ["4 parsecs", "GB", "-1GB", "0MB", "iB"])
def test_a_bad_size_is_refused(text):
    with pytest.raises(ValueError, match="size"):
        ivfpq.parse_size(text)


@pytest.mark.parametrize("limit, factory", [(None, "IVF4096,PQ64x8"), ("4GB", "IVF4096,PQ64x8"),
                                            ("500MB", "IVF4096,PQ32x8"), ("300MB", "IVF4096,PQ16x8"),
                                            ("200MB", "IVF4096,PQ8x8")])
def test_parameters_fit_the_memory_allowed(limit, factory):
    """Ten million vectors of dimension 512: the longest code that fits, about sqrt(N) cells."""
    bytes_allowed = ivfpq.parse_size(limit) if limit else None
    chosen = ivfpq.plan(10_000_000, 512, bytes_allowed)
    assert chosen.factory == factory
    if bytes_allowed:
        assert chosen.size(10_000_000, 512) <= bytes_allowed
        longer = ivfpq.Plan(chosen.cells, chosen.m * 2, 8, chosen.train)
        assert chosen.m == 64 or longer.size(10_000_000, 512) > bytes_allowed
    with pytest.raises(ValueError, match=r"cannot hold .* needs 16\d\.\d MiB; allow at least that"):
        ivfpq.plan(10_000_000, 512, 100 * 2**20)


@pytest.mark.slow  # builds an index (the first of these tests builds the module's)
def test_recorded_recall_is_an_independent_count(built):
    folder, vectors, info = built
    assert info["kind"] == ivfpq.KIND and info["items"] == len(vectors) and info["recall@10"] >= 0.95
    searcher, _ = _searcher(folder, info)
    queries = approximate.sample_queries(vectors, info["recall_queries"])
    exact_top = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]  # numpy, not the library
    found = searcher.search(queries, 10)[1]
    recall = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact_top, found)])
    assert info["recall@10"] == pytest.approx(recall, abs=1e-4)


def test_tuning_keeps_the_fewest_cells_that_reach_the_target(built):
    """The recorded nprobe reaches the target on the build's sampled queries and, within an eighth below it,
    fewer cells do not (found by bisection after doubling overshot)."""
    folder, vectors, info = built
    searcher, _ = _searcher(folder, info)
    queries = approximate.sample_queries(vectors, info["recall_queries"])
    exact_top = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]

    def recall(nprobe: int) -> float:
        searcher.nprobe = nprobe
        found = searcher.search(queries, 10)[1]
        return float(np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact_top, found)]))

    nprobe = info["nprobe"]
    assert nprobe > 1 and recall(nprobe) >= approximate.TARGET_RECALL
    assert recall(nprobe - max(1, nprobe // 8)) < approximate.TARGET_RECALL


@pytest.mark.slow  # builds an index (the first of these tests builds the module's)
def test_lists_merged_on_disk_equal_lists_filled_in_memory(built):
    folder, vectors, info = built
    searcher, _ = _searcher(folder, info)
    on_disk = faiss.extract_index_ivf(searcher.index).invlists
    in_memory = faiss.read_index(str(folder / info["files"]["index"]), faiss.IO_FLAG_SKIP_IVF_DATA)
    lists = faiss.ArrayInvertedLists(in_memory.nlist, in_memory.code_size)
    in_memory.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    in_memory.ntotal = 0
    in_memory.add_with_ids(vectors, np.arange(len(vectors)))
    assert searcher.index.ntotal == in_memory.ntotal == len(vectors)
    for cell in range(in_memory.nlist):
        size = in_memory.invlists.list_size(cell)
        assert on_disk.list_size(cell) == size
        if size:
            for read, count in ((lambda il: il.get_ids(cell), size),
                                (lambda il: il.get_codes(cell), size * in_memory.code_size)):
                np.testing.assert_array_equal(faiss.rev_swig_ptr(read(on_disk), count),
                                              faiss.rev_swig_ptr(read(in_memory.invlists), count))


@pytest.mark.slow  # builds an index (the first of these tests builds the module's)
def test_reranked_scores_are_the_exact_scores(built, one_thread):
    folder, vectors, info = built
    index = Index.open(folder)
    queries = approximate.sample_queries(vectors, 20, seed=7)
    ids, scores = index.search_batch(queries, 10, approximate=True)
    exact_ids, exact_scores = index.search_batch(queries, 10, approximate=False)
    first = index.search(queries[0], top_k=10)  # the approximate index by default
    stored = index.vectors(ids.ravel()).reshape(*ids.shape, DIM)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", stored, queries), atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    for q in range(len(queries)):
        exact = dict(zip(exact_ids[q].tolist(), exact_scores[q].tolist()))
        shared = [j for j, i in enumerate(ids[q]) if int(i) in exact]
        assert len(shared) >= 8
        np.testing.assert_allclose(scores[q, shared], [exact[int(ids[q, j])] for j in shared], atol=1e-6)
    assert [r.id for r in first] == ids[0].tolist()


@pytest.mark.slow  # builds an index (the first of these tests builds the module's)
def test_lists_are_memory_mapped_read_only(built):
    folder, _, info = built
    searcher, _ = _searcher(folder, info)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(searcher.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    data = folder / info["files"]["lists"]
    mapped = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if str(data) in line]
    assert mapped and all(fields[1].startswith("r-") for fields in mapped)  # readable, never writable
    assert (folder / info["files"]["index"]).stat().st_size < data.stat().st_size  # the codes are not in it


@pytest.mark.slow  # builds an index (the first of these tests builds the module's)
def test_the_index_fits_the_memory_allowed(tmp_path):
    vectors = _clustered(5000, seed=1)
    _write_index(tmp_path / "idx", vectors)
    roomy = approximate.refresh(tmp_path / "idx", "ivfpq")
    limit = roomy["bytes"] - 1  # the longest code no longer fits
    tight = approximate.refresh(tmp_path / "idx", "ivfpq", limit)
    assert (roomy["pq_m"], tight["pq_m"]) == (DIM // 8, DIM // 16)
    assert tight["bytes"] <= limit and tight["max_index_memory"] == limit
    assert sorted(p.name for p in (tmp_path / "idx").glob("approximate*")) == sorted(tight["files"].values())
    with pytest.raises(ValueError, match="cannot hold an IVF-PQ index of 5,000 vectors"):
        approximate.refresh(tmp_path / "idx", "ivfpq", 10_000)


@pytest.mark.slow  # builds an index (the first of these tests builds the module's)
def test_auto_builds_ivfpq_where_ivf_flat_would_not_fit_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(approximate, "AUTO_THRESHOLD", 1000)
    folder = tmp_path / "idx"
    _write_index(folder, _clustered(3000, seed=2))
    assert approximate.refresh(folder, "auto")["kind"] == approximate.FLAT_KIND
    limit = approximate.flat_bytes(3000, DIM) - 1  # IVF-Flat's float32 vectors would not fit
    info = approximate.refresh(folder, "auto", limit)
    assert info["kind"] == ivfpq.KIND and not (folder / approximate.FILE).exists()
    assert approximate.refresh(folder, "auto") == info  # kept as it is, with its limit, by a later run
    _write_index(folder, _clustered(100, seed=3))  # an update: the index no longer covers every item
    assert Index.open(folder).store._approximate is None
    updated = approximate.refresh(folder, "auto")
    assert updated["items"] == 3100 and updated["files"] != info["files"]
    assert not (folder / info["files"]["lists"]).exists() and Index.open(folder).store._approximate is not None
    assert approximate.refresh(folder, "never") is None and not list(folder.glob("approximate*"))


@pytest.mark.slow
def test_index_and_search_end_to_end(tmp_path, one_thread, capsys):
    photos, index = tmp_path / "photos", tmp_path / "idx"
    write_folder(photos, 12)
    assert main(["index", str(photos), "--model", "tiny-vit", "--random-init", "--index", str(index), "--workers",
                 "0", "--no-progress", "--approximate", "ivfpq", "--max-index-memory", "1MB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    info = json.loads((index / "config.json").read_text())["approximate"]
    assert lines[1] == approximate.describe(info) and lines[1].startswith("approximate index: IVF1,PQ16x3 (12 vectors")
    assert info["recall@10"] == 1.0 and info["max_index_memory"] == 2**20
    answers = []
    for extra in ([], ["--exact"]):
        assert main(["search", str(index), "a blue photo", "--top", "5", "--json", *extra]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert [r["id"] for r in answers[0]] == [r["id"] for r in answers[1]]
    np.testing.assert_allclose([r["score"] for r in answers[0]], [r["score"] for r in answers[1]], atol=1e-6)
    with pytest.raises(SystemExit):  # argparse's own error, naming the option
        main(["index", str(photos), "--index", str(index), "--max-index-memory", "4 parsecs"])
    assert "--max-index-memory: '4 parsecs' is not a size" in capsys.readouterr().err
    assert main(["index", str(photos), "--index", "postgresql://me@nowhere/db?table=t", "--approximate", "ivfpq"]) == 2
    assert "PostgreSQL index has pgvector's HNSW" in capsys.readouterr().err


def test_nprobe_chosen_at_open_trades_recall_for_speed(built, one_thread):
    folder, vectors, info = built
    rng = np.random.default_rng(11)
    queries = vectors[rng.integers(0, len(vectors), 40)] + 0.1 * rng.standard_normal((40, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def recall(index: Index) -> float:
        return float(np.mean([len({r.id for r in index.search(q, top_k=10)} &
                                  {r.id for r in index.search(q, top_k=10, approximate=False)}) / 10
                              for q in queries]))

    with Index.open(folder, nprobe=1) as one, Index.open(folder) as tuned, \
            Index.open(folder, nprobe=info["cells"]) as every:
        assert (one.store._approximate[0].nprobe, tuned.store._approximate[0].nprobe) == (1, info["nprobe"])
        assert info["nprobe"] > 1
        low, middle, high = recall(one), recall(tuned), recall(every)
    assert low < middle <= high and high >= 0.95, (low, middle, high)
    with pytest.raises(ValueError, match="at least 1"):
        Index.open(folder, nprobe=0)
    with pytest.raises(ValueError, match="PostgreSQL index's HNSW"):
        Index.open("postgresql://me@nowhere/db?table=t", nprobe=8)
