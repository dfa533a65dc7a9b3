"""Named pretrained weights: registry, checked download from a local HTTP server, cache reuse, clear failures."""
import hashlib
import http.server
import re
import socket
import threading
import time

import pytest
import torch

import clipforge
from clipforge import pretrained
from clipforge.models import CLIP, get_model_config
from clipforge.pretrained import PRETRAINED, DownloadError, PretrainedWeights, cache_dir, download


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes
    requests: list = []

    def do_GET(self):
        _Handler.requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
        self.send_response(200)
        cut = self.path.startswith("/cut/")  # announce more bytes than are sent, then hang up
        self.send_header("Content-Length", str(len(body) + (1000 if cut else 0)))
        self.end_headers()
        try:
            self.wfile.write(body[: len(body) // 2] if cut else body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A tiny model's OpenAI-layout state dict as a torch.save file: (model, bytes)."""
    torch.manual_seed(0)
    model = CLIP(get_model_config("tiny-vit")).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path.read_bytes()


@pytest.fixture
def registered(server, weights_file, monkeypatch):
    """Serve the tiny weights at several URLs and register them as 'tiny-vit'; returns a helper."""
    _, body = weights_file
    _Handler.requests.clear()

    def register(prefix: str = "/ok/", sha256: str | None = None) -> PretrainedWeights:
        _Handler.files[f"{prefix}tiny-vit.pt"] = body
        weights = PretrainedWeights(f"{server}{prefix}tiny-vit.pt", sha256 or hashlib.sha256(body).hexdigest(),
                                    "tiny-vit")
        monkeypatch.setitem(PRETRAINED, "tiny-vit", weights)
        return weights

    return register


def _no_partial_files(folder) -> bool:
    return not list(folder.glob("*.part"))


def test_registry_has_openais_nine_models():
    assert clipforge.available_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32",
                                            "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for name, weights in PRETRAINED.items():
        assert re.fullmatch(r"[0-9a-f]{64}", weights.sha256)
        assert weights.url.split("/")[-2] == weights.sha256 and weights.url.startswith("https://openaipublic.")
        assert get_model_config(weights.architecture) == get_model_config(name)
    assert pretrained.pretrained_weights("ViT-B-32") is PRETRAINED["ViT-B/32"]
    assert pretrained.pretrained_weights("tiny-vit") is None


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "env"))
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("CLIPFORGE_CACHE")
    assert cache_dir() == cache_dir("~/.cache/clipforge")


def test_named_load_downloads_checks_and_reuses_the_cache(registered, weights_file, tmp_path, monkeypatch):
    model, body = weights_file
    registered()
    loaded, preprocess = clipforge.load("tiny-vit", device="cpu", download_root=tmp_path)
    assert (tmp_path / "tiny-vit.pt").read_bytes() == body and _no_partial_files(tmp_path)
    assert not loaded.training and preprocess.config.image_size == 32
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert len(_Handler.requests) == 1
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    again = clipforge.create_model("tiny-vit", pretrained="openai")  # the cached file, no new request
    assert len(_Handler.requests) == 1
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_cached_file_with_wrong_checksum_is_downloaded_again(registered, weights_file, tmp_path):
    registered()
    (tmp_path / "tiny-vit.pt").write_bytes(b"stale")
    with pytest.warns(UserWarning, match="does not match its SHA-256"):
        path = download("tiny-vit", download_root=tmp_path, progress=False)
    assert path.read_bytes() == weights_file[1] and len(_Handler.requests) == 1


def test_bad_checksum_deletes_the_download(registered, tmp_path):
    weights = registered(sha256="0" * 64)
    with pytest.raises(DownloadError) as info:
        download("tiny-vit", download_root=tmp_path, progress=False)
    message = str(info.value)
    assert weights.url in message and "0" * 64 in message
    assert hashlib.sha256(_Handler.files["/ok/tiny-vit.pt"]).hexdigest() in message
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_leaves_nothing(registered, tmp_path):
    weights = registered("/cut/")
    with pytest.raises(DownloadError, match=r"/cut/tiny-vit.pt was interrupted after \d+ of \d+ bytes"):
        download("tiny-vit", download_root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [] and weights.url.endswith("/cut/tiny-vit.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_error_says_what_to_fetch_and_where(registered, tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{_free_port()}/ok/tiny-vit.pt"  # nothing listens there
    monkeypatch.setitem(PRETRAINED, "tiny-vit", PretrainedWeights(url, "a" * 64, "tiny-vit"))
    with pytest.raises(DownloadError) as info:
        clipforge.load("tiny-vit", device="cpu", download_root=tmp_path)
    message = str(info.value)
    assert f"download {url} elsewhere and put the file at {tmp_path / 'tiny-vit.pt'}" in message
    assert "a" * 64 in message and list(tmp_path.iterdir()) == []


def test_http_error_and_timeout(registered, server, tmp_path, monkeypatch):
    monkeypatch.setitem(PRETRAINED, "tiny-vit", PretrainedWeights(f"{server}/missing.pt", "a" * 64, "tiny-vit"))
    with pytest.raises(DownloadError, match=r"missing.pt: the server answered HTTP 404.*put the file at"):
        download("tiny-vit", download_root=tmp_path, progress=False)
    registered("/slow/")
    with pytest.raises(DownloadError, match=r"/slow/tiny-vit.pt.*timed out"):
        download("tiny-vit", download_root=tmp_path, progress=False, timeout=0.2)
    assert _no_partial_files(tmp_path) and not (tmp_path / "tiny-vit.pt").exists()


def test_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="no pretrained weights are registered for 'ViT-H/14'.*ViT-B/32"):
        download("ViT-H/14", download_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="'ViT-H/14' is neither an existing file.*RN50"):
        clipforge.load("ViT-H/14", device="cpu", download_root=tmp_path)
    with pytest.raises(ValueError, match="pretrained='openai' needs a model name with published weights"):
        clipforge.create_model("tiny-vit", pretrained="openai")
