"""Named pretrained weights: registry, checked download from a local HTTP server, cache reuse, clear failures."""
import hashlib
import http.server
import re
import socket
import time

import pytest
import safetensors.torch
import torch

import clipforge
from clipforge.io import pretrained
from clipforge.models import CLIP, get_model_config
from clipforge.io.pretrained import PRETRAINED, DownloadError, PretrainedWeights, cache_dir, download


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes
    hub_sha256: dict = {}  # path -> the SHA-256 the stand-in hub publishes, when not the file's own
    requests: list = []

    def do_HEAD(self):  # the hub's answer for a stored file: a redirect carrying its SHA-256
        _Handler.requests.append(f"HEAD {self.path}")
        body = self.files.get(self.path)
        if body is None or "/resolve/" not in self.path:
            self.send_error(404)
            return
        self.send_response(302)
        self.send_header("X-Linked-Etag", f'"{self.hub_sha256.get(self.path, hashlib.sha256(body).hexdigest())}"')
        self.send_header("Location", f"/storage{self.path}")
        self.end_headers()

    def do_GET(self):
        _Handler.requests.append(self.path)
        if "/resolve/" in self.path and self.path in self.files:  # the hub redirects to its storage
            self.send_response(302)
            self.send_header("Location", f"/storage{self.path}")
            self.end_headers()
            return
        body = self.files.get(self.path.removeprefix("/storage"))
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
def server(loopback_http):
    return loopback_http(_Handler)


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


@pytest.fixture
def hub(server, weights_file, monkeypatch):
    """A stand-in of the Hugging Face hub layout (``/ORG/REPO/resolve/main/FILE``, a redirect whose
    ``X-Linked-Etag`` is the file's SHA-256) with 'tiny-vit' tags in OpenCLIP's table; returns the body."""
    model, pickled = weights_file
    body = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    _Handler.requests.clear()
    _Handler.hub_sha256.clear()
    _Handler.files["/org/tiny-st/resolve/main/open_clip_model.safetensors"] = body
    _Handler.files["/org/tiny-bin/resolve/main/open_clip_pytorch_model.bin"] = pickled
    _Handler.files["/org/tiny-bad/resolve/main/open_clip_model.safetensors"] = body
    _Handler.hub_sha256["/org/tiny-bad/resolve/main/open_clip_model.safetensors"] = "b" * 64
    monkeypatch.setenv("HF_ENDPOINT", server)
    table = {"tiny-vit": {"st": {"hf_hub": "org/tiny-st", "quick_gelu": False},
                          "bin": {"hf_hub": "org/tiny-bin", "quick_gelu": False},
                          "bad": {"hf_hub": "org/tiny-bad", "quick_gelu": False},
                          "squash": {"hf_hub": "org/tiny-st", "quick_gelu": False,
                                     "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                                    "interpolation": "bicubic", "resize_mode": "squash"}}}}
    monkeypatch.setattr(pretrained, "_open_clip_table", lambda: table)
    return body


def test_open_clip_tag_downloads_from_the_hub_checks_and_reuses_the_cache(hub, weights_file, tmp_path, monkeypatch):
    model, _ = weights_file
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    assert ("tiny-vit", "st") in clipforge.list_pretrained()
    loaded, _, preprocess = clipforge.create_model_and_transforms("tiny-vit", pretrained="st")
    target = tmp_path / "org--tiny-st" / "open_clip_model.safetensors"
    assert target.read_bytes() == hub and _no_partial_files(target.parent)
    assert (target.parent / "open_clip_model.safetensors.sha256").read_text().strip() == hashlib.sha256(hub).hexdigest()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert _Handler.requests[0].startswith("HEAD ") and len(_Handler.requests) == 3  # HEAD, GET, redirected GET
    clipforge.create_model("tiny-vit", pretrained="st")  # from the cache: checked, no request
    assert len(_Handler.requests) == 3
    squashed = clipforge.create_model_and_transforms("tiny-vit", pretrained="squash")[2]
    assert squashed.config.resize_mode == "squash" and squashed.config.mean == (0.5, 0.5, 0.5)
    assert preprocess.config.resize_mode == "shortest"


def test_hub_file_falls_back_to_the_pickle_name_and_bad_hub_checksum_is_refused(hub, tmp_path):
    path = download("tiny-vit", download_root=tmp_path, progress=False, tag="bin")
    assert path == tmp_path / "org--tiny-bin" / "open_clip_pytorch_model.bin"
    assert path.read_bytes() == _Handler.files["/org/tiny-bin/resolve/main/open_clip_pytorch_model.bin"]
    with pytest.raises(DownloadError, match=f"checksum mismatch.*expected SHA-256 {'b' * 64}"):
        download("tiny-vit", download_root=tmp_path, progress=False, tag="bad")
    assert not (tmp_path / "org--tiny-bad" / "open_clip_model.safetensors").exists()
    with pytest.raises(ValueError, match="no pretrained weights are registered for 'tiny-vit' with tag 'nope'.*st"):
        download("tiny-vit", download_root=tmp_path, tag="nope")
    with pytest.raises(FileNotFoundError, match="pretrained='nope' is neither an existing checkpoint path nor"):
        clipforge.create_model("tiny-vit", pretrained="nope")


def test_weights_of_the_other_activation_warn(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="trained with GELU but the config uses QuickGELU.*'tiny-vit'"):
        clipforge.create_model("tiny-vit", pretrained="st", quick_gelu=True)


def test_offline_hub_error_says_what_to_fetch_and_where(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(DownloadError) as info:
        download("tiny-vit", download_root=tmp_path, progress=False, tag="st")
    message = str(info.value)
    target = tmp_path / "org--tiny-st" / "open_clip_model.safetensors"
    assert f"/org/tiny-st/resolve/main/open_clip_model.safetensors elsewhere and put the file at {target}" in message
    assert f"its SHA-256 (the hub lists it on the file's page) in {target}.sha256" in message
    target.write_bytes(hub)  # done by hand, as the message says: used from there, offline
    target.with_name(target.name + ".sha256").write_text(hashlib.sha256(hub).hexdigest())
    assert download("tiny-vit", download_root=tmp_path, progress=False, tag="st") == target
