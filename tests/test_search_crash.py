"""Crash safety of ``clipforge index``: SIGKILL at random moments, several times, then every stored vector is
checked against a fresh encoding of its file, and the next run finishes the work the killed ones left."""
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from clipforge.search import Index

from test_search_index import assert_every_vector_matches_its_file, write_folder

IMAGES = 240


def _committed(index_dir) -> int:
    try:
        with sqlite3.connect(f"file:{index_dir / 'metadata.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def _start(photos, index_dir):
    command = [sys.executable, "-m", "clipforge", "index", str(photos), "--model", "tiny-vit", "--index",
               str(index_dir), "--workers", "0", "--batch-size", "4", "--threads", "1"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_at_random_moment(photos, index_dir, rng, while_encoding: bool) -> None:
    """Start indexing and SIGKILL it after a random delay, counted from its start or, ``while_encoding``,
    from the moment its progress bar appears (the encoding loop has begun)."""
    proc = _start(photos, index_dir)
    if while_encoding:
        started = threading.Event()
        threading.Thread(target=lambda: started.set() if "indexing" in proc.stderr.read(10) else None,
                         daemon=True).start()
        started.wait(timeout=120)
        time.sleep(rng.uniform(0.0, 0.6))
    else:
        time.sleep(rng.uniform(0.5, 4.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_sigkill_at_random_points_never_leaves_a_wrong_vector(tmp_path, one_thread):
    photos, index_dir = tmp_path / "photos", tmp_path / "index"
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
