"""JPEG thumbnails of indexed images, made once and kept on disk under a name derived from the image's
content, so that a changed image gets a new thumbnail and a new ETag."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from clipforge.data import load_image

THUMBNAIL_SIZES = (128, 256, 512)
_VERSION = "2"  # part of every ETag: bump when the way thumbnails are made changes (2: EXIF orientation applied)


def default_folder(index) -> Path:
    """Where thumbnails are kept unless the service is told: ``thumbnails/`` in an index folder; for a
    PostgreSQL index, a folder of the user's cache named after the table and server (its URL without the
    password), shared by the services of one machine."""
    if index.store.kind == "folder":
        return Path(index.folder) / "thumbnails"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(index.store.location.encode()).hexdigest()[:16]
    return cache / "clipforge" / "thumbnails" / f"{index.store.table}-{digest}"


class Thumbnails:
    """Thumbnails of ``index``'s images in ``folder``; ``max_pixels`` bounds the images decoded."""

    def __init__(self, index, folder: str | os.PathLike, max_pixels: int | None = None):
        self.index, self.folder, self.max_pixels = index, Path(folder), max_pixels

    def etag(self, content_key: str, size: int) -> str:
        return '"' + hashlib.sha256(f"{_VERSION}:{content_key}:{size}".encode()).hexdigest()[:32] + '"'

    def get(self, item_id: int, content_key: str, size: int) -> bytes:
        """The thumbnail of item ``item_id`` (KeyError when unknown) fitting ``size`` pixels, from the cache
        or made now; ``content_key`` identifies the image's content (its hash)."""
        path = self.folder / f"{self.etag(content_key, size).strip(chr(34))}.jpg"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        data = self._make(self.index.image_bytes(item_id), size, str(item_id))
        self._store(path, data)
        return data

    def _make(self, encoded: bytes, size: int, name: str) -> bytes:
        image = load_image(encoded, max_pixels=self.max_pixels, draft_size=size, name=f"item {name}")
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        if image.mode != "RGB":
            image = _on_white(image)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85, optimize=True)
        return out.getvalue()

    def _store(self, path: Path, data: bytes) -> None:
        """Write by rename, so that a reader never sees half a file, even if the service dies while writing."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _on_white(image: Image.Image) -> Image.Image:
    """An RGB copy with any transparency laid over white (JPEG has no alpha channel)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
