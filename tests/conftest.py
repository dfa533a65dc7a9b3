"""Shared fixtures, and the one rule for what `make test-fast` leaves out. Add yours below; do not remove others'.

A test is ``slow`` when it is marked so (each test that took a second or more on two idle cores) or when it uses
one of the session fixtures below that train a model first (about 15 s the first time).
"""
import pytest
import torch

SLOW_FIXTURES = {"trained_tiny_model", "search_index", "search_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def loopback_http():
    """Start HTTP servers on 127.0.0.1 (a free port each) for the tests' stand-ins of download hosts: yields
    ``start(handler_class) -> base URL``; every server started is shut down after the module."""
    import http.server
    import threading
    servers = []

    def start(handler) -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def one_thread():
    """One intra-op thread: faster on a small shared CPU, and the same results in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory):
    """A randomly initialised (seed 0) tiny-vit saved as a clipforge model folder, for CLI end-to-end tests.

    Random init on purpose: training even ~100 steps costs minutes on a shared 2-core CPU, and the
    tests check the plumbing and output formats; metric values are proven on fake models in test_evaluate.
    """
    from clipforge.io.factory import create_model, save
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-vit-random"
    save(create_model("tiny-vit"), folder)
    return folder


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory):
    """A tiny-vit trained by ``clipforge train`` on the built-in data (about 15 s): a run directory whose
    model has learned colours and shapes well enough for zero-shot transfer to the held-out pairs."""
    from clipforge.cli import main
    run = tmp_path_factory.mktemp("runs") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--model", "tiny-vit", "--train-data", "builtin:5000", "--steps", "120",
                     "--batch-size", "32", "--lr", "1.5e-3", "--warmup", "20", "--workers", "0",
                     "--save-every", "120", "--output", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="session")
def search_photos(tmp_path_factory):
    """57 generated JPEG photos in two folders, ``a/`` and ``b/``, where ``b/copy.jpg`` is ``a/00000.jpg``'s
    bytes again (for dedup): the images the search service tests index."""
    import shutil
    from clipforge.data import ShapesDataset
    root = tmp_path_factory.mktemp("photos")
    shapes = ShapesDataset(56, seed=3, image_size=96)
    for i in range(56):
        folder = root / ("a" if i < 28 else "b")
        folder.mkdir(exist_ok=True)
        shapes.image(i).save(folder / f"{i:05d}.jpg", quality=90)
    shutil.copy(root / "a" / "00000.jpg", root / "b" / "copy.jpg")
    return root


@pytest.fixture(scope="session")
def search_index(tmp_path_factory, search_photos, trained_tiny_model):
    """An index of ``search_photos`` built by the search library with the briefly trained tiny-vit."""
    from clipforge.search import Index
    folder = tmp_path_factory.mktemp("indexes") / "photos.index"
    Index.build(folder, [str(search_photos)], model=str(trained_tiny_model), progress=False)
    return folder


@pytest.fixture(scope="session")
def search_server(search_index, tmp_path_factory):
    """``clipforge serve`` over ``search_index`` in its own process on 127.0.0.1 (a free port), with small
    upload limits (1 MiB, 4 megapixels) so that the tests can exceed them; yields the base URL."""
    from clipforge.serve.server import start_child
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "w") as stderr:
        process, base = start_child(search_index, "--max-upload-mb", "1", "--max-pixels", "4000000", stderr=stderr)
    yield base
    process.terminate()
    process.wait(timeout=30)


MICRO_MODEL = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                               "head_width": 16},
               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def micro_json(tmp_path):
    """A two-layer model config (full BPE vocabulary, so real captions tokenize) that trains in milliseconds
    a step, as a JSON file path for ``--model``."""
    import json
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO_MODEL))
    return str(path)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL 16 with pgvector (the pgserver wheel) for the session, on a Unix socket in a temporary
    folder (tests/pg_server.py); ``postgres.url(table)`` names an index table in it."""
    from pg_server import LocalPostgres
    server = LocalPostgres()
    yield server
    server.close()


@pytest.fixture(params=["folder", "postgresql"])
def index_at(request, tmp_path):
    """Where a test's index lives, once per store: a folder, or a fresh table of the session's PostgreSQL.
    The suites that take it run the same assertions on both stores."""
    if request.param == "folder":
        return tmp_path / "index"
    import uuid
    return request.getfixturevalue("postgres").url(f"t_{uuid.uuid4().hex[:12]}")
