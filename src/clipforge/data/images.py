"""Finding and decoding images: the one list of image file types, the one recursive folder scan, and the one
decoder, whose errors carry a reason code (``clipforge.data.samples.REASONS``) so that training can skip
and count a bad image while evaluation and inference report it. Phone and camera formats (HEIC, AVIF, RAW)
are in ``.camera``, orientation and capture times in ``.exif``.
"""
from __future__ import annotations

import fnmatch
import io
import os
import struct
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Callable, Iterable, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError

from clipforge.data import camera
from clipforge.data.exif import CaptureTime, exif_date, mtime_capture, read_exif, upright
from clipforge.data.samples import BadSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", *camera.PHOTO_EXTENSIONS)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
# Folders that hold no user images: version control, package caches, NAS thumbnail stores.
SKIPPED_FOLDERS = (".git", "node_modules", "@eaDir", "__pycache__")
# Errors Pillow's decoders (and its AVIF and pillow-heif's HEIF plugins) raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, RuntimeError, struct.error)
_HEAD = 4096  # bytes read to tell a file's format
_UNKNOWN = "not an image format Pillow recognises"
_NOT_RAW = "neither a camera RAW that LibRaw reads nor an image format Pillow recognises"


class MissingImage(BadSample, FileNotFoundError):
    """An image path that does not exist: a ``BadSample`` (``missing_file``) and a FileNotFoundError."""

    def __init__(self, detail: str):
        BadSample.__init__(self, "missing_file", detail)


@dataclass(frozen=True)
class ImageRef:
    """An image file, or a member of a tar shard (``member`` set, bytes at ``offset``, ``size`` long)."""

    path: str
    member: str | None = None
    offset: int = 0
    size: int = 0

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    def read(self) -> bytes:
        """The encoded bytes of the shard member (``member`` must be set)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


ImageSource = Union[str, os.PathLike, bytes, IO[bytes], ImageRef]


VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm")  # what clipforge.data.video reads


def is_video_name(name: str) -> bool:
    """Whether a file name has a video extension and is not hidden (``.x.mp4``, macOS ``._x.mp4``)."""
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension and is not hidden (``.x.jpg``, macOS ``._x.jpg``)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str | os.PathLike, exclude: Iterable[str] = (), videos: bool = False) -> list[str]:
    """Image files under ``folder`` (and video files, with ``videos``), recursively, in a fixed (sorted) order.

    Hidden files and folders and ``SKIPPED_FOLDERS`` are passed over, as are paths (relative to
    ``folder``, with ``/``) matching any glob in ``exclude``.
    """
    wanted = (lambda f: is_image_name(f) or is_video_name(f)) if videos else is_image_name
    exclude = list(exclude)
    found = []
    for root, dirs, files in os.walk(folder):
        relative = os.path.relpath(root, folder).replace(os.sep, "/")
        relative = "" if relative == "." else relative + "/"
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS
                         and not _excluded(relative + d, exclude))
        found += [os.path.join(root, f) for f in sorted(files)
                  if wanted(f) and not _excluded(relative + f, exclude)]
    return found


def _excluded(relative: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(os.path.basename(relative), p) for p in patterns)


def load_image(source: ImageSource, max_pixels: int | None = None, draft_size: int | None = None,
               name: str | None = None) -> Image.Image:
    """Open and fully decode an image: a path, encoded bytes, a binary file object or an ``ImageRef``.

    Every format Pillow reads, plus HEIC/HEIF (pillow-heif), AVIF (Pillow 11.3+) and camera RAW (rawpy: the
    embedded JPEG preview when its shorter side has at least 1,024 pixels, or ``draft_size``; else LibRaw's
    demosaicing), the latter two families from the ``photos`` extra. The image comes upright: its EXIF
    orientation (HEIF's rotation, LibRaw's for RAW) is applied, for every format alike.

    Every failure is a ``BadSample`` (a ValueError) naming the image, with a reason code:
    ``missing_file`` (also a FileNotFoundError), ``unreadable_file``, ``empty_file``, ``unreadable_image``
    (corrupt, truncated, not an image), ``too_many_pixels`` (more than ``max_pixels``, default PIL's
    limit of 89,478,485, checked before decoding) or ``missing_extra`` (a HEIC or RAW file without the
    ``photos`` extra). ``draft_size`` lets JPEGs decode at 1/2, 1/4 or 1/8 scale (HEIC from an embedded
    thumbnail, RAW from its preview or at half size) while both sides stay at least ``draft_size`` pixels:
    much faster, but not pixel-identical to a full decode, so use it for training or opt-in fast indexing
    (the full size stays in ``img.info["full_size"]``). The image keeps its own mode (convert it as needed).
    """
    if isinstance(source, (str, os.PathLike, ImageRef)):
        name = name or str(source)
        data = read_image_bytes(source, name)
        return _decode(io.BytesIO(data), len(data), name, max_pixels, draft_size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), len(source), name or "<bytes>", max_pixels, draft_size)
    if hasattr(source, "read"):
        return _decode(source, None, name or str(getattr(source, "name", "<file object>")), max_pixels, draft_size)
    raise TypeError(f"expected a path, bytes, a binary file or an ImageRef, got {type(source).__name__}")


def _decode(f: IO[bytes], size: int | None, name: str, max_pixels: int | None, draft_size: int | None) -> Image.Image:
    if size == 0:
        raise BadSample("empty_file", f"cannot read image {name}: the file is empty (0 bytes)")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    f, head = _peek(f)
    kind = camera.kind(head, name)
    if kind == "raw":
        data = f.read()
        img = camera.decode_raw(data, name, limit, draft_size)
        if img is not None:
            return upright(img)
        f = io.BytesIO(data)  # not a RAW LibRaw knows (a JPEG or TIFF by another name): Pillow may know it
    elif kind is not None:
        camera.enable(kind, name)
    with warnings.catch_warnings():  # the limit below is ours, with one message for every path
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(f, name, limit, _NOT_RAW if kind == "raw" else _UNKNOWN)
        if draft_size is not None:
            img.info["full_size"] = img.size  # draft() shrinks img.size; keep what the file holds
            img.draft(None, (draft_size, draft_size))
        try:
            img.load()
        except Image.DecompressionBombError:
            raise BadSample("too_many_pixels", f"image {name} has more pixels than max_pixels={limit}") from None
        except _DECODE_ERRORS as e:
            raise BadSample("unreadable_image", f"cannot decode image {name}: {e} (the file is truncated or "
                                                "corrupt)") from None
    return upright(img)


def _peek(f: IO[bytes]) -> tuple[IO[bytes], bytes]:
    """(a file positioned where ``f`` was, its first ``_HEAD`` bytes from there)."""
    try:
        start = f.tell()
        head = f.read(_HEAD)
        f.seek(start)
        return f, head
    except (OSError, ValueError, AttributeError):  # a pipe or socket: keep what it holds in memory
        f = io.BytesIO(f.read())
        return f, f.getvalue()[:_HEAD]


def _open(f: IO[bytes], name: str, limit: int, unknown: str = _UNKNOWN) -> Image.Image:
    """Pillow's lazy open (headers only), refusing an image of more than ``limit`` pixels."""
    try:
        img = Image.open(f)
    except UnidentifiedImageError:
        raise BadSample("unreadable_image", f"cannot read image {name}: {unknown}") from None
    except Image.DecompressionBombError:
        raise BadSample("too_many_pixels", f"image {name} has more pixels than max_pixels={limit}") from None
    except _DECODE_ERRORS as e:
        raise BadSample("unreadable_image", f"cannot read image {name}: {e} (the file is truncated or "
                                            "corrupt)") from None
    width, height = img.size
    if width * height > limit:
        raise BadSample("too_many_pixels", f"image {name} is {width}x{height} = {width * height} pixels, "
                                           f"more than max_pixels={limit}; skip it or raise the limit")
    return img


class ImageFiles(torch.utils.data.Dataset):
    """Images by reference, decoded and preprocessed for encoding: item ``i`` is ``(i, tensor, None)``, or
    ``(i, None, message)`` for an image that cannot be read; ``collate_images`` batches them."""

    def __init__(self, refs: Sequence[ImageSource], preprocess: Callable, max_pixels: int | None = None):
        self.refs, self.preprocess, self.max_pixels = refs, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.refs[i], self.max_pixels)), None
        except (OSError, ValueError) as e:  # a decoding BadSample, or preprocessing refusing the image
            message, name = str(e), str(self.refs[i])
            return i, None, message if name in message else f"{name}: {message}"


def read_image_bytes(source: str | os.PathLike | ImageRef, name: str | None = None) -> bytes:
    """The encoded bytes of an image file or shard member, as stored; a ``BadSample`` naming the image
    (``name``, default the path or member) if it is missing or cannot be read."""
    name = name or str(source)
    try:
        if isinstance(source, ImageRef) and source.member is not None:
            return source.read()
        with open(source.path if isinstance(source, ImageRef) else source, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        path = Path(source.path if isinstance(source, ImageRef) else source)
        kind = "is a directory, not an image file" if path.is_dir() else "does not exist (not found)"
        raise MissingImage(f"image file {name} {kind}") from None
    except OSError as e:
        raise BadSample("unreadable_file", f"cannot open image {name}: {e.strerror or e}") from None


@dataclass(frozen=True)
class ImageInfo:
    """What the file says about a decoded image: its full size (upright) and its EXIF capture time, if any:
    ``taken`` as the file writes it ('YYYY:MM:DD HH:MM:SS'), ``captured`` parsed (aware when EXIF gives the
    offset). ``capture_time(info, mtime_ns)`` adds the fallback to the file's modification time."""

    width: int
    height: int
    taken: str | None = None
    captured: datetime | None = None


def image_info(img: Image.Image) -> ImageInfo:
    """Size (before any draft decoding) and EXIF DateTimeOriginal (else DateTime) of a loaded image."""
    width, height = img.info.get("full_size", img.size)
    taken, captured = exif_date(read_exif(img))
    return ImageInfo(int(width), int(height), taken, captured)


def capture_time(source: ImageInfo | Image.Image | ImageSource, mtime_ns: int | None = None) -> CaptureTime | None:
    """When a photo was taken: EXIF DateTimeOriginal (else DateTime), with OffsetTimeOriginal (OffsetTime)
    when present, for every format that carries EXIF (JPEG, HEIC, AVIF, WebP, PNG, TIFF and TIFF-based RAW;
    other RAWs through LibRaw, without offset); else the file's modification time ``mtime_ns``.

    ``source`` is an ``ImageInfo`` or a decoded image (nothing is read again), or a path, bytes, binary file
    or ``ImageRef``, whose metadata is read without decoding its pixels; for a path, ``mtime_ns`` defaults
    to the file's. Unreadable or malformed metadata counts as none. None only when there is neither an EXIF
    date nor an mtime (bytes without ``mtime_ns``)."""
    if isinstance(source, ImageInfo):
        captured = source.captured
    elif isinstance(source, Image.Image):
        captured = image_info(source).captured
    else:
        captured = _file_date(source)
    if captured is not None:
        return CaptureTime(captured, "exif")
    if mtime_ns is None and isinstance(source, (str, os.PathLike)):
        try:
            mtime_ns = os.stat(source).st_mtime_ns
        except OSError as e:
            raise MissingImage(f"image file {source} cannot be found or read: {e.strerror or e}") from None
    return mtime_capture(mtime_ns) if mtime_ns is not None else None


def _file_date(source: ImageSource) -> datetime | None:
    """The EXIF capture time of an image file, its pixels not decoded; None if it has none or cannot be read."""
    try:
        if isinstance(source, (str, os.PathLike, ImageRef)):
            f, name = io.BytesIO(read_image_bytes(source)), str(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            f, name = io.BytesIO(source), "<bytes>"
        else:
            f, name = source, str(getattr(source, "name", "<file object>"))
        f, head = _peek(f)
        kind = camera.kind(head, name)
        if kind == "raw":
            data = f.read()
            block = camera.read_raw_exif(data, name)
            if block is not None:
                exif = Image.Exif()
                exif.load(block)
                return exif_date(exif)[1]
            f = io.BytesIO(data)
        elif kind is not None:
            camera.enable(kind, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                return exif_date(read_exif(img))[1]
    except (BadSample, Image.DecompressionBombError, *_DECODE_ERRORS):
        return None


class DescribedImages(ImageFiles):
    """``ImageFiles`` for indexing: item ``i`` is ``(i, tensor, ImageInfo, None)``, or
    ``(i, None, None, (reason, message))`` for an image that cannot be used (a ``REASONS`` code).
    ``draft_size`` decodes JPEGs at reduced scale, as in ``load_image``."""

    def __init__(self, refs: Sequence[ImageSource], preprocess: Callable, max_pixels: int | None = None,
                 draft_size: int | None = None):
        super().__init__(refs, preprocess, max_pixels)
        self.draft_size = draft_size

    def __getitem__(self, i: int):
        try:
            img = load_image(self.refs[i], self.max_pixels, self.draft_size)
            return i, self.preprocess(img), image_info(img), None
        except BadSample as e:
            return i, None, None, (e.reason, str(e))
        except (OSError, ValueError) as e:  # preprocessing refusing a decoded image
            return i, None, None, ("unreadable_image", f"{self.refs[i]}: {e}")


def collate_described(items) -> tuple[list[int], torch.Tensor | None, list[ImageInfo], list[tuple[int, str, str]]]:
    """(indices of the usable images, their stacked tensors or None, their infos, (index, reason, message)
    of the others), for ``DescribedImages``."""
    good = [(i, x, info) for i, x, info, problem in items if problem is None]
    bad = [(i, *problem) for i, _, _, problem in items if problem is not None]
    tensors = torch.stack([x for _, x, _ in good]) if good else None
    return [i for i, _, _ in good], tensors, [info for _, _, info in good], bad


def collate_images(items) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """(indices of the readable images, their stacked tensors or None, error messages of the others)."""
    good = [(i, x) for i, x, error in items if error is None]
    errors = [error for _, _, error in items if error is not None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, errors
    return torch.tensor([i for i, _ in good]), torch.stack([x for _, x in good]), errors
