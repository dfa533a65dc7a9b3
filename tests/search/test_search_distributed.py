"""``torchrun --nproc_per_node 2 -m clipforge index`` (gloo, CPU) writes the index one process writes: the
same items, ids, rows and metadata, and the same vectors."""
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import numpy as np

from clipforge.search import Index

from test_search_index import stored_vectors, write_folder, write_shard

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(index_dir):
    with sqlite3.connect(index_dir / "metadata.sqlite") as db:
        return db.execute("SELECT * FROM items ORDER BY id").fetchall()


@pytest.mark.slow
def test_two_ranks_build_the_index_one_process_builds(tmp_path, one_thread):
    photos, shards = tmp_path / "photos", tmp_path / "shards"
    write_folder(photos, 23)
    (photos / "bad.jpg").write_bytes(b"bad")
    shards.mkdir()
    write_shard(shards / "000.tar", 200, 6)
    sources = [str(photos), str(shards / "000.tar")]
    single = Index.build(tmp_path / "one", sources, model="tiny-vit", random_init=True, workers=0, batch_size=4, progress=False)
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), "-m", "clipforge", "index", *sources, "--model", "tiny-vit", "--random-init", "--index",
               str(tmp_path / "two"), "--workers", "0", "--batch-size", "4", "--no-progress", "--json"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert '"indexed": 29' in done.stdout and '"unreadable_image": 1' in done.stdout
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")
    two = Index.open(tmp_path / "two")
    ids = [int(i) for i in single.ids()]
    np.testing.assert_allclose(stored_vectors(two, ids), stored_vectors(single, ids), atol=1e-3)
    captioned = [int(i) for i in single.ids(captions=True)]
    assert len(captioned) == 6
    np.testing.assert_allclose(stored_vectors(two, captioned, "captions"),
                               stored_vectors(single, captioned, "captions"), atol=1e-3)
