"""What only the PostgreSQL store does, against a real PostgreSQL 16 with pgvector started for the session:
concurrent indexers, services that see new rows and agree, HNSW recall against exact search, parameterised
SQL under hostile filters, the server stopped mid-run and the run resumed, passwords never shown, and one
clear error for each broken set-up. (The behaviour both stores share runs on both in test_search_index,
test_search_cli and test_search_crash.)"""
import json
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL tests need the postgres extra (psycopg, pgvector)")

from clipforge.cli import main  # noqa: E402
from clipforge.search import Index  # noqa: E402
from clipforge.search.pg.url import parse  # noqa: E402

from test_search_index import assert_every_vector_matches_its_file, write_folder  # noqa: E402


@pytest.fixture
def url(postgres):
    return postgres.url(f"t_{uuid.uuid4().hex[:12]}")


def _sql(url: str, statement: str, params=()):
    where = parse(url)
    with psycopg.connect(where.conninfo, autocommit=True) as conn:
        cursor = conn.execute(statement.replace("{table}", f'"{where.table}"'), params)
        return cursor.fetchall() if cursor.description else None


def _index_command(source, url, *extra):
    return [sys.executable, "-m", "clipforge", "index", str(source), "--model", "tiny-vit", "--random-init",
            "--index", url, "--workers", "0", "--batch-size", "4", "--threads", "1", "--no-progress", *extra]


def _build(url, sources, **options):
    return Index.build(url, sources, model="tiny-vit", random_init=True, workers=0, batch_size=8, progress=False,
                       **options)


@pytest.mark.slow
def test_two_indexers_on_disjoint_sources_write_at_once_and_both_finish(tmp_path, url, one_thread):
    write_folder(tmp_path / "a", 30)
    write_folder(tmp_path / "b", 30, start=100)
    runs = [subprocess.Popen(_index_command(tmp_path / name, url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for name in ("a", "b")]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    paths = [row[0] for row in _sql(url, "SELECT path FROM {table}")]
    expected = sorted(str(p) for p in tmp_path.rglob("img*"))
    assert sorted(paths) == expected  # every file once
    with Index.open(url) as index:
        assert_every_vector_matches_its_file(index)


@pytest.mark.slow
def test_two_indexers_on_the_same_source_never_duplicate_or_lose_an_item(tmp_path, url, one_thread):
    write_folder(tmp_path / "a", 40)
    runs = [subprocess.Popen(_index_command(tmp_path / "a", url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    summaries = sorted(out for out, _ in outputs)
    assert "indexed 0," in summaries[0] and "unchanged 40," in summaries[0]  # the second found the work done
    assert "indexed 40," in summaries[1]
    paths = [row[0] for row in _sql(url, "SELECT path FROM {table}")]
    assert sorted(paths) == sorted(str(p) for p in (tmp_path / "a").rglob("img*"))


def _start_service(url):
    from clipforge.serve.server import start_child
    return start_child(url, "--device", "cpu")


@pytest.mark.slow
def test_services_agree_and_see_rows_an_indexer_commits_without_a_restart(tmp_path, url, one_thread):
    httpx = pytest.importorskip("httpx")
    write_folder(tmp_path / "photos", 6)
    _build(url, [tmp_path / "photos"])
    services = [_start_service(url) for _ in range(2)]
    try:
        body = {"query": "a red photo", "top_k": 50}
        answers = [httpx.post(f"{base}/api/search", json=body, timeout=60).json()["results"] for _, base in services]
        assert len(answers[0]) == 6 and answers[0] == answers[1]
        write_folder(tmp_path / "photos" / "more", 5, start=60)
        _build(url, [tmp_path / "photos"])  # another writer, while both services run
        for _, base in services:
            found = httpx.post(f"{base}/api/search", json=body, timeout=60).json()["results"]
            assert len(found) == 11 and sum("/more/" in r["path"] for r in found) == 5
            assert httpx.get(f"{base}/healthz", timeout=60).json()["items"] == 11
        with Index.open(url) as index:
            expected = index.search("a red photo", top_k=50)
        assert [r["id"] for r in found] == [r.id for r in expected]
        np.testing.assert_allclose([r["score"] for r in found], [r.score for r in expected], atol=1e-6)
    finally:
        for process, _ in services:
            process.terminate()
            process.wait(timeout=30)


def _clustered(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    vectors = centres[rng.integers(0, 40, n)] + 0.7 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


@pytest.mark.slow
def test_hnsw_reaches_its_recall_against_exact_search_and_records_it(tmp_path, url, one_thread):
    write_folder(tmp_path / "photos", 4)
    index = _build(url, [tmp_path / "photos"], approximate="never")
    vectors = _clustered(3000, index.dim)
    rows = [(f"/synthetic/{i}.jpg", f"{i:032x}", "[" + ",".join(map(repr, v.tolist())) + "]")
            for i, v in enumerate(vectors)]
    where = parse(url)
    with psycopg.connect(where.conninfo, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(f'INSERT INTO "{where.table}" (source, path, size, mtime_ns, hash, width, height, embedding) '
                        f"VALUES ('/synthetic', %s, 1, 1, %s, 1, 1, %s)", rows)
    index = _build(url, [tmp_path / "photos"], approximate="always")
    info = index.config["approximate"]
    assert info["kind"].startswith("pgvector HNSW") and info["recall@10"] >= 0.95 and info["items"] == 3004
    ids = index.ids()
    stored = index.vectors(ids)
    rng = np.random.default_rng(7)
    pairs = rng.integers(0, len(stored), (60, 2))
    queries = stored[pairs[:, 0]] + stored[pairs[:, 1]]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    recall = []
    for q in queries:
        truth = set(ids[np.argsort(-(stored @ q), kind="stable")[:10]].tolist())  # independent of the database
        found = {r.id for r in index.search(q, top_k=10, approximate=True)}
        recall.append(len(truth & found) / 10)
        exact = {r.id for r in index.search(q, top_k=10, approximate=False)}
        assert len(exact & truth) >= 9  # ties at the tenth place aside, exact search in SQL is exact
    assert np.mean(recall) >= 0.9, np.mean(recall)
    assert _sql(url, "SELECT count(*) FROM pg_indexes WHERE indexname = %s", (f"{where.table}_hnsw",))[0][0] == 1
    again = _build(url, [tmp_path / "photos"], approximate="never")
    assert again.config["approximate"] is None
    with pytest.raises(ValueError, match="no approximate search here"):
        again.search("a red photo", approximate=True)


def test_hostile_filters_and_queries_stay_values(tmp_path, url, one_thread):
    write_folder(tmp_path / "photos", 5)
    index = _build(url, [tmp_path / "photos"])
    hostile = f"'; DROP TABLE \"{parse(url).table}\"; --"
    assert index.search("a photo", top_k=5, folder=hostile) == []
    assert len(index.search(hostile, top_k=5)) == 5
    assert len(index.search("a photo", top_k=5, folder=hostile + "/", dedup=0.5, min_score=-1)) == 0
    assert len(Index.open(url)) == 5  # the table is still there, whole
    for table in ("x;drop", "Photos", "a" * 41, "1st"):
        with pytest.raises(ValueError, match="not a table name"):
            Index.open(url.rsplit("table=", 1)[0] + f"table={table}")


@pytest.mark.slow
def test_server_stopped_mid_run_gives_one_error_and_the_run_resumes(tmp_path, postgres, url, one_thread):
    photos = tmp_path / "photos"
    write_folder(photos, 160)
    run = subprocess.Popen(_index_command(photos, url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        try:
            if _sql(url, "SELECT count(*) FROM {table}")[0][0] >= 8:
                break
        except psycopg.Error:
            pass
        time.sleep(0.02)
    postgres.stop()
    try:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 2, (out, err[-3000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clipforge index: error: "), err[-3000:]
        assert "PostgreSQL at postgresql://clipforge@/clipforge" in lines[0] and "again" in lines[0]
        with pytest.raises(RuntimeError, match="cannot connect to PostgreSQL at"):
            Index.open(url)
    finally:
        postgres.start()
    committed = _sql(url, "SELECT count(*) FROM {table}")[0][0]
    assert 0 < committed < 160
    done = subprocess.run(_index_command(photos, url), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"unchanged {committed}," in done.stdout and "160 items" in done.stdout
    with Index.open(url) as index:
        assert len(index) == 160
        assert_every_vector_matches_its_file(index)


def test_a_password_never_appears_in_output_config_or_errors(tmp_path, postgres, capsys, one_thread):
    secret = "Sup3rSecretPw"
    url = postgres.url(f"t_{uuid.uuid4().hex[:12]}").replace("clipforge@", f"clipforge:{secret}@")
    write_folder(tmp_path / "photos", 3)
    assert main(["index", str(tmp_path / "photos"), "--model", "tiny-vit", "--random-init", "--index", url,
                 "--workers", "0", "--no-progress"]) == 0
    assert main(["index", str(tmp_path / "photos"), "--index", url, "--workers", "0", "--no-progress", "--json"]) == 0
    assert main(["search", url, "a photo", "--json"]) == 0
    down = url.replace(str(postgres.root), str(tmp_path / "nothing-here"))
    assert main(["search", down, "a photo"]) == 2
    assert main(["index", str(tmp_path / "photos"), "--index", down.replace("password", "x") + "&password=" + secret,
                 "--model", "tiny-vit", "--random-init"]) == 2
    shown = capsys.readouterr()
    assert secret not in shown.out + shown.err and "cannot connect to PostgreSQL at" in shown.err
    with Index.open(url) as index:
        assert secret not in json.dumps(index.config) and secret not in index.store.location
        assert secret not in repr(index.location)


def test_broken_set_ups_each_give_one_clear_error(tmp_path, postgres, url, one_thread):
    bare = postgres.url("t").replace("/clipforge?", "/bare?")
    _sql(postgres.url("t"), "CREATE DATABASE bare")
    try:
        with pytest.raises(RuntimeError, match="has no pgvector extension .*CREATE EXTENSION vector"):
            Index.open(bare)
    finally:
        _sql(postgres.url("t"), "DROP DATABASE bare")
    with pytest.raises(FileNotFoundError, match="no search index in table"):
        Index.open(url)
    other = url.rsplit("table=", 1)[0] + "table=not_ours"
    _sql(other, "CREATE TABLE IF NOT EXISTS not_ours (x int)")
    with pytest.raises(ValueError, match="exists but is not a clipforge index"):
        _build(other, [tmp_path])
    write_folder(tmp_path / "photos", 2)
    _build(url, [tmp_path / "photos"])
    _sql(url, f'UPDATE "{parse(url).table}_meta" SET schema_version = 99')
    with pytest.raises(ValueError, match="schema version 99; this clipforge reads version 1"):
        Index.open(url)


@pytest.mark.slow
def test_copy_between_stores_keeps_ids_vectors_and_results(tmp_path, url, capsys, one_thread):
    write_folder(tmp_path / "photos", 9)
    folder = tmp_path / "index"
    assert main(["index", str(tmp_path / "photos"), "--model", "tiny-vit", "--random-init", "--index", str(folder),
                 "--workers", "0", "--no-progress"]) == 0
    assert main(["index", "--copy-from", str(folder), "--index", url, "--no-progress"]) == 0
    assert main(["index", "--copy-from", url, "--index", str(tmp_path / "back"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "copied 9 items (0 already there); 9 items in postgresql://" in out
    with Index.open(folder) as a, Index.open(url) as b, Index.open(tmp_path / "back") as c:
        np.testing.assert_array_equal(a.ids(), b.ids())
        np.testing.assert_array_equal(a.vectors(a.ids()), b.vectors(b.ids()))
        np.testing.assert_array_equal(a.vectors(a.ids()), c.vectors(c.ids()))
        for index in (b, c):
            assert [(r.id, r.path) for r in index.search("a red photo", top_k=9)] == \
                   [(r.id, r.path) for r in a.search("a red photo", top_k=9)]
        assert b.config["weights_sha256"] == a.config["weights_sha256"] == c.config["weights_sha256"]
    assert main(["index", "--copy-from", str(folder), "--index", url, "--model", "tiny-vit"]) == 2
    write_folder(tmp_path / "photos" / "more", 2, start=50)
    assert main(["index", str(tmp_path / "photos"), "--index", url, "--workers", "0", "--no-progress"]) == 0
    assert "indexed 2," in capsys.readouterr().out  # new ids follow the copied ones
    assert len(set(Index.open(url).ids().tolist())) == 11
