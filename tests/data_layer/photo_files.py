"""Phone and camera photos that the tests make: one picture with a known look, saved as PNG, JPEG, WebP, HEIC
(pillow-heif), AVIF (Pillow) or DNG, with EXIF orientation and date tags. The DNG writer is a minimal TIFF
writer: an RGGB Bayer mosaic of the picture in a sub-directory, an optional JPEG preview in the first
directory, and an EXIF directory with the dates."""
import io
import struct

import numpy as np
from PIL import Image

DATE_TIME_ORIGINAL, OFFSET_TIME_ORIGINAL, SUBSEC_TIME_ORIGINAL = 0x9003, 0x9011, 0x9291
DATE_TIME, OFFSET_TIME = 0x0132, 0x9010
_IN_EXIF_IFD = {DATE_TIME_ORIGINAL, OFFSET_TIME_ORIGINAL, SUBSEC_TIME_ORIGINAL, OFFSET_TIME}
FORMATS = ("PNG", "JPEG", "WEBP", "HEIF", "AVIF")
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "HEIF": ".heic", "AVIF": ".avif", "DNG": ".dng"}


def picture(width: int = 96, height: int = 64) -> Image.Image:
    """An RGB picture that no flip or rotation maps onto itself: colour ramps, a dark disc right of centre
    and a white block in the top-left corner (over 2 % of the pixels, so that LibRaw's automatic brightening,
    which maps the top 1 % to white, leaves a demosaiced DNG at its stored brightness)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([40 + 180 * x / width, 30 + 190 * y / height, 200 - 150 * (x + y) / (width + height)], -1)
    rgb[(x - 0.65 * width) ** 2 + (y - 0.55 * height) ** 2 < (0.18 * height) ** 2] = (30, 40, 60)
    rgb[: height // 6, : width // 5] = 255
    return Image.fromarray(rgb.round().astype(np.uint8))


def exif_bytes(orientation: int | None = None, dates: dict[int, str] | None = None) -> bytes:
    """An EXIF block with an orientation and date tags (the constants above)."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    for tag, text in (dates or {}).items():
        (exif.get_ifd(0x8769) if tag in _IN_EXIF_IFD else exif)[tag] = text
    return exif.tobytes()


def encode(img: Image.Image, fmt: str, exif: bytes = b"") -> bytes:
    """``img`` saved as ``fmt`` (one of ``FORMATS``), near-lossless, with the EXIF block ``exif``."""
    if fmt == "HEIF":
        import pillow_heif
        pillow_heif.register_heif_opener()
    options = {} if fmt == "PNG" else {"quality": 95}
    if exif:  # pillow-heif refuses an empty block
        options["exif"] = exif
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def to_mosaic(img: Image.Image) -> bytes:
    """16-bit RGGB samples of ``img`` made linear with the inverse of LibRaw's output curve (BT.709: power
    0.45, slope 4.5 near black), so that demosaicing gives the picture back."""
    v = np.asarray(img.convert("RGB"), dtype=np.float64) / 255
    linear = np.where(v < 0.081, v / 4.5, ((v + 0.099) / 1.099) ** (1 / 0.45))
    mosaic = np.empty(linear.shape[:2])
    mosaic[0::2, 0::2] = linear[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = linear[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = linear[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = linear[1::2, 1::2, 2]
    return np.round(mosaic * 65535).astype("<u2").tobytes()


# TIFF field types and DNG's colour matrix for a camera whose raw colours are linear sRGB (XYZ -> sRGB, D65)
BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_UNIT = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, SRATIONAL: 8}
_STRUCT = {BYTE: "B", SHORT: "H", LONG: "I"}
XYZ_TO_SRGB = (3.2404542, -1.5371385, -0.4985314, -0.9692660, 1.8760108, 0.0415560, 0.0556434, -0.2040259, 1.0572252)


def dng(img: Image.Image, orientation: int = 1, preview: Image.Image | None = None,
        dates: dict[int, str] | None = None, preview_exif: bytes = b"") -> bytes:
    """A DNG 1.4 of ``img`` (even width and height): the Bayer mosaic in a sub-directory, ``preview`` as a
    baseline JPEG (with ``preview_exif``) in the first directory, ``orientation`` and ``dates`` as tags."""
    width, height = img.size
    mosaic = to_mosaic(img)
    raw_ifd = {254: (LONG, [0]), 256: (LONG, [width]), 257: (LONG, [height]), 258: (SHORT, [16]),
               259: (SHORT, [1]), 262: (SHORT, [32803]), 273: (LONG, [0]), 277: (SHORT, [1]),
               278: (LONG, [height]), 279: (LONG, [len(mosaic)]), 284: (SHORT, [1]), 33421: (SHORT, [2, 2]),
               33422: (BYTE, [0, 1, 1, 2]), 50717: (LONG, [65535])}
    first = {271: (ASCII, "clipforge"), 272: (ASCII, "test camera"), 274: (SHORT, [orientation]),
             330: (LONG, [0]), 34665: (LONG, [0]), 50706: (BYTE, [1, 4, 0, 0]), 50708: (ASCII, "clipforge test"),
             50721: (SRATIONAL, XYZ_TO_SRGB), 50728: (RATIONAL, [1, 1, 1]), 50778: (SHORT, [21])}
    jpeg = b""
    if preview is not None:
        out = io.BytesIO()
        preview.convert("RGB").save(out, "JPEG", quality=95, **({"exif": preview_exif} if preview_exif else {}))
        jpeg = out.getvalue()
        first.update({254: (LONG, [1]), 256: (LONG, [preview.width]), 257: (LONG, [preview.height]),
                      258: (SHORT, [8, 8, 8]), 259: (SHORT, [7]), 262: (SHORT, [6]), 273: (LONG, [0]),
                      277: (SHORT, [3]), 278: (LONG, [preview.height]), 279: (LONG, [len(jpeg)]),
                      284: (SHORT, [1])})
    exif_ifd = {tag: (ASCII, text) for tag, text in (dates or {}).items() if tag in _IN_EXIF_IFD}
    exif_ifd.setdefault(0x9000, (BYTE, list(b"0232")))  # ExifVersion: a directory is never empty
    first.update({tag: (ASCII, text) for tag, text in (dates or {}).items() if tag not in _IN_EXIF_IFD})
    # layout: header, first directory, EXIF directory, raw directory, mosaic, preview
    at_first = 8
    at_exif = at_first + _even(len(_directory(first, at_first)))
    at_raw = at_exif + _even(len(_directory(exif_ifd, at_exif)))
    at_mosaic = at_raw + _even(len(_directory(raw_ifd, at_raw)))
    raw_ifd[273] = (LONG, [at_mosaic])
    first[330], first[34665] = (LONG, [at_raw]), (LONG, [at_exif])
    if jpeg:
        first[273] = (LONG, [at_mosaic + len(mosaic)])
    parts = [b"II*\0" + struct.pack("<I", at_first)]
    parts += [_padded(_directory(d, at)) for d, at in ((first, at_first), (exif_ifd, at_exif), (raw_ifd, at_raw))]
    return b"".join(parts) + mosaic + jpeg


def _even(n: int) -> int:
    return n + n % 2


def _padded(blob: bytes) -> bytes:
    return blob + b"\0" * (len(blob) % 2)


def _values(kind: int, values) -> bytes:
    if kind == ASCII:
        return values.encode() + b"\0"
    if kind in (RATIONAL, SRATIONAL):
        return b"".join(struct.pack("<ii" if kind == SRATIONAL else "<II", round(v * 10**7), 10**7) for v in values)
    return struct.pack(f"<{len(values)}{_STRUCT[kind]}", *values)


def _directory(entries: dict, at: int) -> bytes:
    """A little-endian TIFF directory placed at offset ``at``, its values longer than 4 bytes right after it."""
    tags = sorted(entries)
    data_at = at + 2 + 12 * len(tags) + 4
    table, data = struct.pack("<H", len(tags)), b""
    for tag in tags:
        kind, values = entries[tag]
        blob = _values(kind, values)
        head = struct.pack("<HHI", tag, kind, len(blob) // _UNIT[kind])
        if len(blob) <= 4:
            table += head + blob.ljust(4, b"\0")
        else:
            data = _padded(data)
            table += head + struct.pack("<I", data_at + len(data))
            data += blob
    return table + struct.pack("<I", 0) + data
