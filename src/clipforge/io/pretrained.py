"""Published CLIP weights, OpenAI's (Radford et al. 2021) and OpenCLIP's pretrained tags: where each file
lives, its SHA-256, and one checked download into a local cache (``$CLIPFORGE_CACHE`` or ``~/.cache/clipforge``).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from clipforge.assets import read_json
from clipforge.models.registry import canonical_name

_CHUNK = 1 << 20
# OpenCLIP's hub folders hold the weights under one of these names; the first is tried first, as OpenCLIP does.
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_RELEASE_HASH = re.compile(r"-([0-9a-f]{8,64})\.\w+$")  # OpenCLIP's release files end in a SHA-256 prefix


class DownloadError(RuntimeError):
    """A download that failed: offline, interrupted, or with the wrong checksum; the message says what to do."""


class _NotOnServer(DownloadError):
    """HTTP 404: the next alternative URL, if any, is tried."""


@dataclass(frozen=True)
class PretrainedWeights:
    """A downloadable weights file and the registered architecture it fits.

    ``sha256`` is the file's SHA-256, a prefix of it (OpenCLIP's release file names carry one), or ""
    for a Hugging Face hub file, whose SHA-256 the hub publishes with it (``X-Linked-Etag``).
    """

    url: str
    sha256: str
    architecture: str  # a name in clipforge's model registry; its activation is the one the weights need
    preprocess: dict | None = None  # PreprocessConfig keys, where these weights differ from OpenAI's
    alternatives: tuple[str, ...] = ()  # tried in turn when the host has no file at ``url`` (HTTP 404)


def _openai(sha256: str, filename: str, architecture: str) -> PretrainedWeights:
    # OpenAI's URLs carry the file's SHA-256 as their second-to-last path component.
    return PretrainedWeights(f"https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}", sha256,
                             architecture)


# OpenAI's names (as ``clip.available_models()``) -> weights. Tests and mirrors may add or replace entries.
PRETRAINED: dict[str, PretrainedWeights] = {
    "RN50": _openai("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt", "RN50"),
    "RN101": _openai("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt", "RN101"),
    "RN50x4": _openai("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt", "RN50x4"),
    "RN50x16": _openai("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt",
                       "RN50x16"),
    "RN50x64": _openai("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt",
                       "RN50x64"),
    "ViT-B/32": _openai("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt",
                        "ViT-B-32-quickgelu"),
    "ViT-B/16": _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt",
                        "ViT-B-16-quickgelu"),
    "ViT-L/14": _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt",
                        "ViT-L-14-quickgelu"),
    "ViT-L/14@336px": _openai("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                              "ViT-L-14-336px.pt", "ViT-L-14-336-quickgelu"),
}


def list_pretrained() -> list[tuple[str, str]]:
    """(architecture, tag) pairs with downloadable weights, as OpenCLIP's ``list_pretrained()``."""
    return [(name, tag) for name, tags in _open_clip_table().items() for tag in tags
            if canonical_name(name) is not None]


def pretrained_tags(name: str) -> list[str]:
    """The tags ``create_model(name, pretrained=TAG)`` accepts: OpenCLIP's for this architecture."""
    return list(_open_clip_table().get(canonical_name(name) or name, {}))


def pretrained_weights(name: str, tag: str | None = None) -> PretrainedWeights | None:
    """The weights for ``name`` and ``tag``, or None. Without a tag: OpenAI's, for OpenAI's name ('ViT-B/32')
    or the registry's ('ViT-B-32', 'ViT-B-32-quickgelu'); with one: OpenCLIP's table ('laion2b_s34b_b79k').
    """
    if tag is None or tag == "openai":
        if name in PRETRAINED:
            return PRETRAINED[name]
        arch = canonical_name(name)
        return next((w for w in PRETRAINED.values()
                     if arch is not None and _base(w.architecture) == _base(arch)), None)
    arch = canonical_name(name)
    entry = _open_clip_table().get(arch, {}).get(tag) if arch is not None else None
    return None if entry is None else _open_clip_weights(arch, entry)


def _base(arch: str) -> str:
    return arch.removesuffix("-quickgelu")


def _open_clip_table() -> dict[str, dict[str, dict]]:
    return {k: v for k, v in read_json("open_clip_pretrained.json").items() if not k.startswith("_")}


def _open_clip_weights(arch: str, entry: dict) -> PretrainedWeights:
    # the architecture the weights were trained with: OpenCLIP's table records the activation per tag
    trained = _base(arch) + ("-quickgelu" if entry["quick_gelu"] else "")
    architecture = canonical_name(trained) or arch
    url = entry.get("url", "")
    if url.startswith("https://openaipublic."):  # OpenAI's URLs carry the full SHA-256
        return PretrainedWeights(url, url.split("/")[-2], architecture, entry.get("preprocess"))
    if (found := _RELEASE_HASH.search(url)) is not None:
        return PretrainedWeights(url, found.group(1), architecture, entry.get("preprocess"))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")  # huggingface_hub's mirror setting
    urls = [f"{endpoint}/{entry['hf_hub']}/resolve/main/{name}" for name in HUB_WEIGHTS]
    return PretrainedWeights(urls[0], "", architecture, entry.get("preprocess"), tuple(urls[1:]))


def cache_dir(download_root: str | Path | None = None) -> Path:
    """Where downloads go: ``download_root``, else ``$CLIPFORGE_CACHE``, else ``~/.cache/clipforge``."""
    root = download_root or os.environ.get("CLIPFORGE_CACHE") or "~/.cache/clipforge"
    return Path(root).expanduser()


def download(name: str, download_root: str | Path | None = None, progress: bool = True,
             timeout: float = 60.0, tag: str | None = None) -> Path:
    """Path of the cached weights file for ``name`` (and OpenCLIP ``tag``), downloading and checking it first.

    A cached file is reused only if its SHA-256 matches; the download goes to a ``.part`` file that is
    renamed only once the checksum matches, so no partial file ever looks complete.
    """
    weights = pretrained_weights(name, tag)
    if weights is None:
        if tag is None:
            raise ValueError(f"no pretrained weights are registered for {name!r}; available: {', '.join(PRETRAINED)}")
        raise ValueError(f"no pretrained weights are registered for {name!r} with tag {tag!r}; its tags: "
                         f"{', '.join(pretrained_tags(name)) or 'none'} (clipforge.list_pretrained() lists all)")
    return download_weights(weights, download_root, progress, timeout)


def download_weights(weights: PretrainedWeights, download_root: str | Path | None = None, progress: bool = True,
                     timeout: float = 60.0) -> Path:
    """``download`` for a given ``PretrainedWeights``: the cached, verified file, fetched if needed."""
    urls = (weights.url, *weights.alternatives)
    targets = [cache_dir(download_root) / _cache_name(url) for url in urls]
    for target in targets:
        if _is_verified(target, weights.sha256):
            return target
    for i, (url, target) in enumerate(zip(urls, targets)):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _fetch(url, weights.sha256, target, progress, timeout)
            return target
        except _NotOnServer:
            if i == len(urls) - 1:
                raise
    raise AssertionError("unreachable")


def _cache_name(url: str) -> str:
    """Where a URL's file goes in the cache: its file name, under ``org--repo/`` for a hub file."""
    path = urlparse(url).path
    if "/resolve/" in path:
        repo, _, rest = path.strip("/").partition("/resolve/")
        return f"{repo.replace('/', '--')}/{rest.split('/', 1)[-1]}"
    return Path(path).name


def _is_verified(target: Path, expected: str) -> bool:
    """True when ``target`` holds the expected file: its SHA-256 starts with ``expected`` (or, for a hub
    file, equals the one recorded beside it when it was downloaded and checked)."""
    if not target.is_file():
        return False
    actual = sha256_of(target)
    recorded = _sidecar(target)
    if expected and actual.startswith(expected) or not expected and recorded is not None and actual == recorded:
        return True
    if not expected and recorded is None:
        warnings.warn(f"{target} has no recorded SHA-256 ({target.name}.sha256 beside it); downloading it again")
    else:
        warnings.warn(f"{target} does not match its SHA-256 checksum {expected or recorded}; downloading it again")
    return False


def _sidecar(target: Path) -> str | None:
    path = target.with_name(target.name + ".sha256")
    return path.read_text().strip() if path.is_file() else None


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, expected: str, target: Path, progress: bool, timeout: float) -> None:
    how_to = _how_to(url, expected, target)
    from_host = not expected
    if from_host:
        expected = _published_sha256(url, timeout, how_to)
    response = _open(url, timeout, how_to, urllib.request.urlopen)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        received, actual = _stream(response, part, target.name, progress)
    except (OSError, http.client.HTTPException) as e:  # connection reset, timeout mid-transfer
        part.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} was interrupted ({e}); the partial file was deleted. "
                            f"Try again. {how_to}") from e
    expected_size = response.headers.get("Content-Length")
    if expected_size is not None and received != int(expected_size):
        part.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} was interrupted after {received} of {expected_size} bytes; "
                            f"the partial file was deleted. Try again. {how_to}")
    if not actual.startswith(expected):
        part.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {url}: expected SHA-256 {expected}, got {actual}; "
                            f"the downloaded file was deleted. Try again; if it persists, the file at that URL "
                            f"is not the registered one")
    if from_host:  # what a later run checks the cached file against
        target.with_name(target.name + ".sha256").write_text(actual + "\n")
    os.replace(part, target)


def _how_to(url: str, expected: str, target: Path) -> str:
    checksum = (f" (SHA-256 {expected})" if len(expected) == 64 else
                f" (SHA-256 starting {expected})" if expected else
                f", and its SHA-256 (the hub lists it on the file's page) in {target}.sha256")
    return (f"If this machine is offline, download {url} elsewhere and put the file at {target}{checksum}; "
            f"it is used from there")


def _open(url: str, timeout: float, how_to: str, opener, method: str = "GET"):
    try:
        return opener(urllib.request.Request(url, method=method), timeout=timeout)
    except urllib.error.HTTPError as e:
        kind = _NotOnServer if e.code == 404 else DownloadError
        raise kind(f"cannot download {url}: the server answered HTTP {e.code} {e.reason}. {how_to}") from e
    except (urllib.error.URLError, OSError) as e:  # offline, refused, DNS failure, timeout
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url}: {reason}. {how_to}") from e


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the hub's own answer, not the storage it redirects to, carries the checksum


def _published_sha256(url: str, timeout: float, how_to: str) -> str:
    """The SHA-256 the Hugging Face hub publishes for a file: ``X-Linked-Etag`` of its resolve URL."""
    opener = urllib.request.build_opener(_NoRedirect).open
    try:
        response = _open(url, timeout, how_to, opener, method="HEAD")
        headers = response.headers
        response.close()
    except DownloadError as e:
        if not isinstance(e.__cause__, urllib.error.HTTPError) or e.__cause__.code not in (301, 302, 303, 307, 308):
            raise
        headers = e.__cause__.headers
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").strip('W/"')
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise DownloadError(f"{url}: the server published no SHA-256 for this file (X-Linked-Etag), so its "
                            f"download cannot be checked. {how_to}")
    return etag


def _stream(response, part: Path, label: str, progress: bool) -> tuple[int, str]:
    """Copy the response body to ``part`` with a progress bar -> (bytes received, hex SHA-256)."""
    total = response.headers.get("Content-Length")
    digest, received = hashlib.sha256(), 0
    with response, open(part, "wb") as out, tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                                                  unit_divisor=1024, desc=label, disable=not progress) as bar:
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return received, digest.hexdigest()
