"""Finding and decoding images: the one list of image file types, the one recursive folder scan, and the one
decoder, whose errors carry a reason code (``clipforge.data.samples.REASONS``) so that training can skip
and count a bad image while evaluation and inference report it.
"""
from __future__ import annotations

import fnmatch
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Sequence, Union

import torch
from PIL import Image, UnidentifiedImageError

from clipforge.data.samples import BadSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
# Folders that hold no user images: version control, package caches, NAS thumbnail stores.
SKIPPED_FOLDERS = (".git", "node_modules", "@eaDir", "__pycache__")
# Errors Pillow's decoders raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


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


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension and is not hidden (``.x.jpg``, macOS ``._x.jpg``)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Image files under ``folder``, recursively, in a fixed (sorted) order.

    Hidden files and folders and ``SKIPPED_FOLDERS`` are passed over, as are paths (relative to
    ``folder``, with ``/``) matching any glob in ``exclude``.
    """
    exclude = list(exclude)
    found = []
    for root, dirs, files in os.walk(folder):
        relative = os.path.relpath(root, folder).replace(os.sep, "/")
        relative = "" if relative == "." else relative + "/"
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS
                         and not _excluded(relative + d, exclude))
        found += [os.path.join(root, f) for f in sorted(files)
                  if is_image_name(f) and not _excluded(relative + f, exclude)]
    return found


def _excluded(relative: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(os.path.basename(relative), p) for p in patterns)


def load_image(source: ImageSource, max_pixels: int | None = None, draft_size: int | None = None,
               name: str | None = None) -> Image.Image:
    """Open and fully decode an image: a path, encoded bytes, a binary file object or an ``ImageRef``.

    Every failure is a ``BadSample`` (a ValueError) naming the image, with a reason code:
    ``missing_file`` (also a FileNotFoundError), ``unreadable_file``, ``empty_file``, ``unreadable_image``
    (corrupt, truncated, not an image) or ``too_many_pixels`` (more than ``max_pixels``, default PIL's
    limit of 89,478,485, checked before decoding). ``draft_size`` lets JPEGs decode at 1/2, 1/4 or 1/8
    scale while both sides stay at least ``draft_size`` pixels: much faster, but not pixel-identical to a
    full decode, so use it for training or opt-in fast indexing (the full size stays in
    ``img.info["full_size"]``). The image keeps its own mode (convert it as needed).
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
    with warnings.catch_warnings():  # the limit below is ours, with one message for every path
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(f)
        except UnidentifiedImageError:
            raise BadSample("unreadable_image", f"cannot read image {name}: not an image format Pillow "
                                                "recognises") from None
        except Image.DecompressionBombError:
            raise BadSample("too_many_pixels", f"image {name} has more pixels than max_pixels={limit}") from None
        except _DECODE_ERRORS as e:
            raise BadSample("unreadable_image", f"cannot read image {name}: {e} (the file is truncated or "
                                                "corrupt)") from None
        width, height = img.size
        if width * height > limit:
            raise BadSample("too_many_pixels", f"image {name} is {width}x{height} = {width * height} pixels, "
                                               f"more than max_pixels={limit}; skip it or raise the limit")
        if draft_size is not None:
            img.info["full_size"] = (width, height)  # draft() shrinks img.size; keep what the file holds
            img.draft(None, (draft_size, draft_size))
        try:
            img.load()
        except Image.DecompressionBombError:
            raise BadSample("too_many_pixels", f"image {name} has more pixels than max_pixels={limit}") from None
        except _DECODE_ERRORS as e:
            raise BadSample("unreadable_image", f"cannot decode image {name}: {e} (the file is truncated or "
                                                "corrupt)") from None
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
    """What the file says about a decoded image: its full size and the EXIF capture time, if any."""

    width: int
    height: int
    taken: str | None = None


_EXIF_IFD, _DATE_TIME_ORIGINAL, _DATE_TIME = 0x8769, 36867, 306


def image_info(img: Image.Image) -> ImageInfo:
    """Size (before any draft decoding) and EXIF DateTimeOriginal (else DateTime) of a loaded image."""
    width, height = img.info.get("full_size", img.size)
    try:
        exif = img.getexif()
        taken = exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL) or exif.get(_DATE_TIME)
    except Exception:  # EXIF blocks are often malformed; a capture time is optional
        taken = None
    taken = str(taken).strip("\x00 ") if taken else None
    return ImageInfo(int(width), int(height), taken or None)


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
