"""Photos from phones and cameras: HEIC/HEIF (pillow-heif), AVIF (Pillow itself) and camera RAW (rawpy, on
LibRaw). A file is told apart by its first bytes, or for RAW also by its name; the packages are imported only
when such a file is met, and without them the file is a ``BadSample`` (``missing_extra``) naming the extra.
"""
from __future__ import annotations

import io
import struct
from datetime import datetime

from PIL import Image, features

from clipforge.data.exif import DATE_TAGS, EXIF_IFD, exif_block, exif_date, quiet
from clipforge.data.samples import BadSample

HEIF_EXTENSIONS = (".heic", ".heif", ".hif")
AVIF_EXTENSIONS = (".avif",)
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw")
PHOTO_EXTENSIONS = HEIF_EXTENSIONS + AVIF_EXTENSIONS + RAW_EXTENSIONS
EXTRA = "pip install 'clipforge[photos]'"
# A RAW file's embedded JPEG preview stands in for the sensor data when its shorter side has at least this
# many pixels (or draft_size, when given): it is the camera's own rendering, and decoding it is one to two
# orders of magnitude faster than demosaicing.
PREVIEW_MIN_SIDE = 1024

_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_RAW_MAGIC = (b"IIRO", b"IIRS", b"MMOR", b"IIU\0", b"FUJIFILMCCD-RAW")  # Olympus ORF, Panasonic RW2, Fuji RAF
# LibRaw's flip (dcraw's encoding) -> EXIF orientation
_FLIP_ORIENTATION = {0: 1, 1: 2, 3: 3, 2: 4, 4: 5, 6: 6, 7: 7, 5: 8}
_ready: set[str] = set()


def kind(head: bytes, name: str) -> str | None:
    """``"heif"``, ``"avif"`` or ``"raw"`` for a file starting with ``head`` (4 KiB or more of it) and named
    ``name``; None for everything else, which Pillow decodes itself."""
    brands = _ftyp_brands(head)
    if brands & _AVIF_BRANDS:
        return "avif"
    if b"crx " in brands:  # Canon CR3, an ISO base media file like HEIF
        return "raw"
    if brands & _HEIF_BRANDS:
        return "heif"
    if name.lower().endswith(RAW_EXTENSIONS) or head.startswith(_RAW_MAGIC) or _tiff_raw(head):
        return "raw"
    return None


def enable(what: str, name: str) -> None:
    """Make Pillow open ``what`` (``"heif"`` or ``"avif"``); a ``missing_extra`` BadSample if it cannot."""
    if what in _ready:
        return
    if what == "heif":
        try:
            import pillow_heif
        except ImportError:
            raise _missing(name, "HEIC/HEIF images need pillow-heif") from None
        pillow_heif.register_heif_opener()
    elif not features.check("avif"):
        raise _missing(name, "AVIF images need Pillow 11.3 or later, built with AVIF")
    _ready.add(what)


def decode_raw(data: bytes, name: str, limit: int, draft_size: int | None) -> Image.Image | None:
    """Decode a camera RAW file: its embedded JPEG preview when that is large enough (``PREVIEW_MIN_SIDE``),
    else the sensor data demosaiced by LibRaw (AHD, camera white balance, sRGB, 8 bits; at half size when
    ``draft_size`` allows). Nothing is decoded when the image has more than ``limit`` pixels. The result
    carries LibRaw's orientation and the capture time in ``info["exif"]`` (``exif_block``), not yet applied,
    and the RAW's size in ``info["full_size"]``. None when LibRaw does not know the format."""
    rawpy = _rawpy(name)
    try:
        with rawpy.RawPy() as raw:
            raw.open_buffer(io.BytesIO(data))
            sizes = raw.sizes
            width, height = sizes.width, sizes.height
            pixels = max(width * height, sizes.raw_width * sizes.raw_height)
            if pixels > limit:
                raise BadSample("too_many_pixels", f"image {name} is a {width}x{height} camera RAW, more than "
                                                   f"max_pixels={limit}; skip it or raise the limit")
            exif = _raw_exif(raw, data)  # before decoding, which resets LibRaw's flip to the user_flip asked for
            img = _preview(raw, width, height, limit, draft_size) or _demosaic(raw, width, height, draft_size)
    except BadSample:
        raise
    except rawpy.LibRawFileUnsupportedError:
        return None
    except (rawpy.LibRawTooBigError, rawpy.LibRawUnsufficientMemoryError, MemoryError):
        raise BadSample("too_many_pixels", f"camera RAW {name} is too large to decode") from None
    except (rawpy.LibRawError, ValueError) as e:
        raise BadSample("unreadable_image", f"cannot decode camera RAW {name}: {_reason(e)} (the file is "
                                            "truncated or corrupt)") from None
    img.info.update({"full_size": (width, height), "exif": exif})
    return img


def read_raw_exif(data: bytes, name: str) -> bytes | None:
    """The ``exif_block`` that ``decode_raw`` attaches (orientation, capture time), read without decoding
    pixels; None when LibRaw does not know the format."""
    rawpy = _rawpy(name)
    try:
        with rawpy.RawPy() as raw:
            raw.open_buffer(io.BytesIO(data))
            return _raw_exif(raw, data)
    except rawpy.LibRawFileUnsupportedError:
        return None
    except (rawpy.LibRawError, MemoryError) as e:
        raise BadSample("unreadable_image", f"cannot read camera RAW {name}: {_reason(e)}") from None


def _preview(raw, width: int, height: int, limit: int, draft_size: int | None) -> Image.Image | None:
    """The embedded JPEG preview, decoded, if it shows the whole picture at the size needed; else None."""
    need = min(draft_size or PREVIEW_MIN_SIDE, width, height)
    try:
        thumb = raw.extract_thumb()
        if not isinstance(thumb.data, bytes):
            return None
        img = Image.open(io.BytesIO(thumb.data))
        w, h = img.size
        same_shape = abs(w * height - h * width) <= 0.02 * width * h  # not a letterboxed or cropped preview
        if img.format != "JPEG" or min(w, h) < need or w * h > limit or not same_shape:
            return None
        if draft_size is not None:
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    except Exception:  # LibRaw's no/unsupported thumbnail, a corrupt preview: the sensor data remains
        return None
    img.info = {}  # the preview's own EXIF, orientation included, is not the RAW's: decode_raw attaches that
    return img


def _demosaic(raw, width: int, height: int, draft_size: int | None) -> Image.Image:
    half = draft_size is not None and min(width, height) // 2 >= draft_size
    rgb = raw.postprocess(use_camera_wb=True, output_bps=8, user_flip=0, half_size=half)
    if rgb.ndim == 3 and rgb.shape[2] == 1:  # a monochrome sensor
        rgb = rgb[..., 0]
    if rgb.ndim != 2 and (rgb.ndim != 3 or rgb.shape[2] != 3):
        raise ValueError(f"LibRaw made an image of shape {rgb.shape}")
    return Image.fromarray(rgb)


def _raw_exif(raw, data: bytes) -> bytes:
    """Orientation from LibRaw; dates from the file's own EXIF where it is TIFF-based (DNG, CR2, NEF, ARW, ...),
    else LibRaw's capture time (no offset, seconds only)."""
    dates = {}
    exif = Image.Exif()
    try:
        with quiet():
            exif.load(data)
            exif.get_ifd(EXIF_IFD)
    except Exception:  # not TIFF-based (CR3, RAF, ORF, RW2), or a broken directory
        exif = None
    if exif_date(exif)[1] is not None:
        sub = exif.get_ifd(EXIF_IFD)
        for tags in DATE_TAGS:
            for tag in tags:
                value = sub.get(tag, exif.get(tag))
                if isinstance(value, str):
                    dates[tag] = value
    elif (taken := _libraw_time(raw)) is not None:
        dates[DATE_TAGS[0][0]] = taken.strftime("%Y:%m:%d %H:%M:%S")
    return exif_block(_FLIP_ORIENTATION.get(raw.sizes.flip, 1), dates)


def _libraw_time(raw) -> datetime | None:
    try:
        taken = raw.other.timestamp  # LibRaw's parse of the date in the camera's local time, 0 when unknown
    except (OverflowError, OSError, ValueError):
        return None
    return taken if taken.year > 1970 else None


def _reason(error: Exception) -> str:
    """LibRaw's message (rawpy passes it as bytes) after the error's name."""
    message = error.args[0] if error.args else ""
    message = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _rawpy(name: str):
    try:
        import rawpy
    except ImportError:
        raise _missing(name, "camera RAW images need rawpy") from None
    return rawpy


def _missing(name: str, what: str) -> BadSample:
    return BadSample("missing_extra", f"cannot read image {name}: {what}, which is not installed: {EXTRA}")


def _ftyp_brands(head: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO base media file's ``ftyp`` box (HEIF, AVIF, CR3, MP4)."""
    if head[4:8] != b"ftyp":
        return set()
    end = min(max(int.from_bytes(head[:4], "big"), 16), len(head), 256)
    return {head[8:12]} | {head[i:i + 4] for i in range(16, end - 3, 4)}


def _tiff_raw(head: bytes) -> bool:
    """A TIFF-based camera RAW, by its first directory: Canon's CR2 marker, a DNGVersion tag, or a reduced-
    resolution first image whose full image is in a sub-directory (NEF and others), which plain TIFFs lack."""
    if head[:4] not in (b"II*\0", b"MM\0*") or len(head) < 8:
        return False
    if head[8:10] == b"CR":
        return True
    endian = "<" if head[:2] == b"II" else ">"
    (at,) = struct.unpack(endian + "I", head[4:8])
    if at + 2 > len(head):
        return False
    (count,) = struct.unpack(endian + "H", head[at:at + 2])
    tags = {}
    for i in range(min(count, (len(head) - at - 2) // 12)):
        entry = head[at + 2 + 12 * i:at + 14 + 12 * i]
        tag, field = struct.unpack(endian + "HH", entry[:4])
        short = field == 3  # a SHORT sits in the first two of the value's four bytes
        tags[tag] = struct.unpack(endian + ("H" if short else "I"), entry[8:10] if short else entry[8:])[0]
    return 50706 in tags or (bool(tags.get(254, 0) & 1) and 330 in tags)
