"""Crash safety of ``clipforge index``: SIGKILL at random moments, several times, then every stored vector is
checked against a fresh encoding of its file, and the next run finishes the work the killed ones left."""
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from clipforge.search import Index

from test_search_index import assert_every_vector_matches_its_file, write_folder

IMAGES = 240


def _committed(index_dir) -> int:
    if isinstance(index_dir, str):  # a PostgreSQL index
        import psycopg
        from clipforge.search.pg.url import parse
        where = parse(index_dir)
        try:
            with psycopg.connect(where.conninfo, autocommit=True) as conn:
                return conn.execute(f'SELECT count(*) FROM "{where.table}"').fetchone()[0]
        except psycopg.Error:
            return 0
    try:
        with sqlite3.connect(f"file:{index_dir / 'metadata.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def _start(photos, index_dir):
    command = [sys.executable, "-m", "clipforge", "index", str(photos), "--model", "tiny-vit", "--random-init", "--index",
               str(index_dir), "--workers", "0", "--batch-size", "4", "--threads", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_at_random_moment(photos, index_dir, rng, while_encoding: bool) -> None:
    """Start indexing and SIGKILL it at a random moment: during start-up, or (``while_encoding``) once this
    run has committed a random number of items, so the kill lands inside the encoding loop at a random
    phase of a batch, however fast the machine."""
    before = _committed(index_dir)
    # startup: a random moment before the first commit; encoding: after a random number of items
    target, delay = (before + rng.randint(1, 30), 120.0) if while_encoding else (before + 1, rng.uniform(0.2, 3.0))
    proc = _start(photos, index_dir)
    deadline = time.monotonic() + delay
    while _committed(index_dir) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if while_encoding:
        time.sleep(rng.uniform(0.0, 0.02))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_wrong_vector(tmp_path, index_at, one_thread):
    photos, index_dir = tmp_path / "photos", index_at
    write_folder(photos, IMAGES)
    rng = random.Random(20261201)
    counts = []
    for attempt in range(5):
        _kill_at_random_moment(photos, index_dir, rng, while_encoding=attempt > 0)
        counts.append(_committed(index_dir))
        if counts[-1]:
            with Index.open(index_dir) as index:  # readable after every kill, each vector its file's
                assert len(index) == counts[-1]
                assert_every_vector_matches_its_file(index)
    print("committed after each kill:", counts)
    assert counts == sorted(counts) and 0 < counts[-1] < IMAGES, counts  # progress kept, work left to do
    done = _start(photos, index_dir)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    assert f"unchanged {counts[-1]}," in out and f"{IMAGES} items" in out, out
    with Index.open(index_dir) as index:
        assert len(index) == IMAGES
        assert_every_vector_matches_its_file(index)
