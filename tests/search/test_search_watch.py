"""An index that keeps itself current: ``clipforge index --watch`` applies additions, changes, renames and
deletions as they happen, a running service shows them without a restart, a SIGKILLed watcher loses nothing on
restart (both stores); a folder index reclaims the rows of deleted and changed files (compaction) while a
reader keeps answering."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clipforge.search import Index, store

from test_search_index import assert_every_vector_matches_its_file, make_image, write_folder


def _watcher(photos, where):
    command = [sys.executable, "-m", "clipforge", "index", str(photos), "--model", "tiny-vit", "--random-init",
               "--index", str(where), "--workers", "0", "--threads", "1", "--watch", "--rescan-interval", "600"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    assert "items in" in first, (first, process.stderr.read() if process.poll() is not None else "")
    return process


def _files(photos) -> set[str]:
    return {str(p) for p in photos.rglob("*") if p.is_file()}


def _wait_until_indexed(where, photos, timeout=90.0) -> None:
    """Until the index holds exactly the files there are, each with its own vector."""
    deadline = time.monotonic() + timeout
    while True:
        with Index.open(where) as index:
            paths = {index.item(i).path for i in index.ids()}
            if paths == _files(photos):
                assert_every_vector_matches_its_file(index)
                return
        assert time.monotonic() < deadline, (sorted(paths ^ _files(photos)))
        time.sleep(0.3)


def _items_served(base) -> int:
    import httpx
    return httpx.get(f"{base}/healthz", timeout=60).json()["items"]


@pytest.mark.slow
def test_watch_follows_the_folder_and_a_killed_watcher_catches_up(tmp_path, index_at, one_thread):
    from clipforge.serve.server import start_child
    photos = tmp_path / "photos"
    write_folder(photos, 6)
    watcher = _watcher(photos, index_at)
    service, base = start_child(index_at, "--device", "cpu")
    try:
        assert _items_served(base) == 6
        write_folder(photos / "new", 2, start=30)                      # added
        make_image(77).save(photos / "img001.jpg")                       # changed
        os.rename(photos / "img002.jpg", photos / "renamed.jpg")         # renamed
        os.remove(photos / "img005.jpg")                                 # deleted
        _wait_until_indexed(index_at, photos)
        deadline = time.monotonic() + 30
        while _items_served(base) != 7:  # the running service shows them, without a restart
            assert time.monotonic() < deadline
            time.sleep(0.3)
        watcher.send_signal(signal.SIGKILL)
        watcher.communicate(timeout=30)
        write_folder(photos / "while-down", 2, start=50)
        os.remove(photos / "new" / "img031.jpg")
        watcher = _watcher(photos, index_at)
        _wait_until_indexed(index_at, photos)
    finally:
        watcher.terminate()
        watcher.communicate(timeout=60)
        service.terminate()
        service.wait(timeout=30)
    assert watcher.returncode == 0  # SIGTERM ends the watch cleanly


def test_compaction_reclaims_dead_rows_while_a_reader_keeps_answering(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(store, "COMPACT_MIN_DEAD_ROWS", 1)
    photos, where = tmp_path / "photos", tmp_path / "index"
    write_folder(photos, 16)
    Index.build(where, [photos], model="tiny-vit", random_init=True, workers=0, progress=False)
    reader = Index.open(where, float32_mib=16)
    before = reader.search("a red photo", top_k=5)
    for i in (0, 1, 2, 3, 4, 5, 6, 7, 8):
        for path in photos.rglob(f"img{i:03d}.*"):
            path.unlink()
    make_image(90).save(next(photos.rglob("img010.*")))
    updated = Index.build(where, [photos], model="tiny-vit", random_init=True, workers=0, progress=False)
    compacted = updated.last_update["compacted"]
    assert compacted["generation"] == 1 and compacted["rows_after"]["images"] == len(updated) == 7
    assert sorted(p.name for p in where.glob("images-*")) == ["images-g0001-00000.npy"]
    assert_every_vector_matches_its_file(updated)
    fresh = updated.search("a red photo", top_k=7)
    after = reader.search("a red photo", top_k=7)  # the reader notices the commit and maps the new files
    assert [(r.id, r.path) for r in after] == [(r.id, r.path) for r in fresh]
    np.testing.assert_allclose([r.score for r in after], [r.score for r in fresh], atol=1e-6)
    assert {r.id for r in before} - {r.id for r in after}  # deleted items are gone from its answers
    again = Index.build(where, [photos], model="tiny-vit", random_init=True, workers=0, progress=False)
    assert "compacted" not in again.last_update and again.last_update["unchanged"] == 7
