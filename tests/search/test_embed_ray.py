"""``clipforge embed --engine ray`` on a local Ray cluster of two CPUs started by the test: the folder it writes is
the local engine's, and stays so when Ray workers (the encoding actor, a decoding task) are killed mid-run."""
import os
import signal
import threading
import time

import pytest

from clipforge.search import embeddings
from clipforge.search.embed import embed

from test_embed import MODEL, OPTIONS, assert_same_output

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
psutil = pytest.importorskip("psutil")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes(cluster, tmp_path, embed_sources, embedded_locally, one_thread):
    summary = embed(tmp_path / "out", embed_sources, MODEL, OPTIONS, random_init=True, engine="ray")
    assert (summary["embedded"], summary["vectors"]) == (8, 29)
    assert_same_output(tmp_path / "out", embedded_locally[0])


def _ray_workers(name: str) -> list:
    """This test's Ray worker processes running ``name`` (Ray titles a worker ``ray::TASK`` while it runs one)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::") and name in process.cmdline()[0]:
                found.append(process)
        except psutil.Error:
            continue
    return found


def _kill_once_a_partition_is_written(folder, killed: list) -> None:
    while not embeddings.finished(folder, 8):
        time.sleep(0.002)
    for name in ("_Encoder", "_decode"):
        for process in _ray_workers(name):
            os.kill(process.pid, signal.SIGKILL)
            killed.append((name, len(embeddings.finished(folder, 8))))


@pytest.mark.slow
def test_killed_ray_workers_are_retried_and_the_output_is_complete(cluster, tmp_path, embed_sources, embedded_locally,
                                                                   one_thread):
    folder, killed = tmp_path / "out", []
    killer = threading.Thread(target=_kill_once_a_partition_is_written, args=(folder, killed), daemon=True)
    killer.start()
    summary = embed(folder, embed_sources, MODEL, OPTIONS, random_init=True, engine="ray")
    killer.join(timeout=5)
    encoder_kills = [done for name, done in killed if name == "_Encoder"]
    assert encoder_kills and encoder_kills[0] < 8, killed  # the actor died while partitions were left to do
    assert (summary["embedded"], summary["vectors"]) == (8, 29)
    assert_same_output(folder, embedded_locally[0])
