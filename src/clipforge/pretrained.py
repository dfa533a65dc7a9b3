"""OpenAI's published CLIP weights (Radford et al. 2021): where each file lives, its SHA-256, and a
checked download into a local cache (``$CLIPFORGE_CACHE`` or ``~/.cache/clipforge``).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from .models.registry import canonical_name

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed: offline, interrupted, or with the wrong checksum; the message says what to do."""


@dataclass(frozen=True)
class PretrainedWeights:
    """A downloadable weights file and the registered architecture it fits."""

    url: str
    sha256: str
    architecture: str  # a name in clipforge's model registry


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
                        "ViT-B-32"),
    "ViT-B/16": _openai("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt",
                        "ViT-B-16"),
    "ViT-L/14": _openai("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt",
                        "ViT-L-14"),
    "ViT-L/14@336px": _openai("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                              "ViT-L-14-336px.pt", "ViT-L-14-336"),
}


def pretrained_weights(name: str) -> PretrainedWeights | None:
    """The weights registered for ``name`` (OpenAI's 'ViT-B/32' or the registry's 'ViT-B-32'), or None."""
    if name in PRETRAINED:
        return PRETRAINED[name]
    arch = canonical_name(name)
    return next((w for w in PRETRAINED.values() if arch is not None and w.architecture == arch), None)


def cache_dir(download_root: str | Path | None = None) -> Path:
    """Where downloads go: ``download_root``, else ``$CLIPFORGE_CACHE``, else ``~/.cache/clipforge``."""
    root = download_root or os.environ.get("CLIPFORGE_CACHE") or "~/.cache/clipforge"
    return Path(root).expanduser()


def download(name: str, download_root: str | Path | None = None, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Path of the cached weights file for ``name``, downloading and checking it first if needed.

    A cached file is reused only if its SHA-256 matches; the download goes to a ``.part`` file that is
    renamed only once the checksum matches, so no partial file ever looks complete.
    """
    weights = pretrained_weights(name)
    if weights is None:
        raise ValueError(f"no pretrained weights are registered for {name!r}; available: {', '.join(PRETRAINED)}")
    target = cache_dir(download_root) / Path(urlparse(weights.url).path).name
    if target.is_file():
        if sha256_of(target) == weights.sha256:
            return target
        warnings.warn(f"{target} does not match its SHA-256 checksum {weights.sha256}; downloading it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    _fetch(weights, target, progress, timeout)
    return target


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(weights: PretrainedWeights, target: Path, progress: bool, timeout: float) -> None:
    url = weights.url
    how_to = (f"If this machine is offline, download {url} elsewhere and put the file at {target} "
              f"(SHA-256 {weights.sha256}); it is used from there")
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: the server answered HTTP {e.code} {e.reason}. {how_to}") from e
    except (urllib.error.URLError, OSError) as e:  # offline, refused, DNS failure, timeout
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url}: {reason}. {how_to}") from e
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
    if actual != weights.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {url}: expected SHA-256 {weights.sha256}, got {actual}; "
                            f"the downloaded file was deleted. Try again; if it persists, the file at that URL "
                            f"is not the registered one")
    os.replace(part, target)


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
