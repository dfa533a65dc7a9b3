"""What a photo's EXIF block says about showing and dating it: the orientation, applied in one place for every
format, and the capture time (DateTimeOriginal with OffsetTimeOriginal and SubSecTimeOriginal, EXIF 2.32),
with the file's modification time as the fallback. EXIF blocks are often malformed: a bad one reads as absent.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from PIL import Image

ORIENTATION = 0x0112
EXIF_IFD = 0x8769
# (date, offset, sub-second) tags, by preference: when the picture was taken, else when the file was last written
DATE_TAGS = ((0x9003, 0x9011, 0x9291), (0x0132, 0x9010, 0x9290))
_IN_EXIF_IFD = {0x9003, 0x9011, 0x9291, 0x9010, 0x9290}
# EXIF orientation -> the transpose that shows the picture upright (EXIF 2.32, Orientation)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_DATE = re.compile(r"(\d{4})[:-](\d\d)[:-](\d\d)[ T](\d\d):(\d\d):(\d\d)")
_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)")


@dataclass(frozen=True)
class CaptureTime:
    """When a photo or video was taken, and where that came from: ``source`` is ``"exif"`` (the camera's clock),
    ``"video"`` (a video container's creation time) or ``"mtime"`` (the file's modification time). ``when`` is
    timezone-aware when the offset is known (EXIF OffsetTime*, and always for a video or an mtime, the latter in
    this machine's local zone); else naive, the camera's local time."""

    when: datetime
    source: str

    def isoformat(self) -> str:
        return self.when.isoformat()


def read_exif(img: Image.Image) -> Image.Exif | None:
    """The image's EXIF block, or None when it has none or it cannot be parsed."""
    try:
        with quiet():
            exif = img.getexif()
            exif.get_ifd(EXIF_IFD)  # parse the sub-IFD now, so that a broken one fails here
        return exif
    except Exception:  # EXIF parsing raises a zoo of errors on malformed blocks; the block is optional
        return None


@contextmanager
def quiet():
    """Without Pillow's warnings about a malformed EXIF block: such a block reads as absent, as said."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def orientation(exif: Image.Exif | None) -> int:
    """The EXIF orientation, 1 to 8; 1 (as stored) when absent or invalid."""
    value = exif.get(ORIENTATION, 1) if exif is not None else 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def upright(img: Image.Image) -> Image.Image:
    """The decoded image as it is meant to be seen: its EXIF orientation applied, then reset to 1 (so that
    applying it twice does nothing). Every format goes through here: JPEG, PNG, WebP, TIFF and AVIF carry the
    orientation in EXIF, pillow-heif turns HEIF's rotation and mirror boxes into pixels itself and resets the
    tag, and camera RAW decoding writes LibRaw's orientation into the tag. ``full_size`` in ``img.info`` turns
    with the picture."""
    exif = read_exif(img)
    method = _UPRIGHT.get(orientation(exif))
    if method is None:
        return img
    turned = img.transpose(method)
    if "full_size" in img.info and method in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
                                               Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270):
        turned.info["full_size"] = img.info["full_size"][::-1]
    exif[ORIENTATION] = 1
    turned._exif = exif  # Pillow's cache of the parsed block, which getexif() returns from now on
    try:
        turned.info["exif"] = exif.tobytes()
    except Exception:  # a block Pillow can parse but not write back: keep the parsed copy only
        turned.info.pop("exif", None)
    return turned


def exif_date(exif: Image.Exif | None) -> tuple[str | None, datetime | None]:
    """(the date text as stored, the parsed time) of DateTimeOriginal, else DateTime; (None, None) when neither
    is a valid date. The time is aware when the matching OffsetTime* tag holds a valid offset."""
    if exif is None:
        return None, None
    try:
        with quiet():
            sub = exif.get_ifd(EXIF_IFD)
    except Exception:  # as in read_exif
        sub = {}
    for date_tag, offset_tag, subsec_tag in DATE_TAGS:
        text = _text(sub.get(date_tag) if date_tag in _IN_EXIF_IFD else exif.get(date_tag))
        when = parse_exif_date(text)
        if when is not None:
            fraction = _text(sub.get(subsec_tag))
            if fraction is not None and fraction.isdigit():
                when = when.replace(microsecond=int(fraction[:6].ljust(6, "0")))
            zone = _parse_offset(_text(sub.get(offset_tag)))
            return text, when.replace(tzinfo=zone) if zone is not None else when
    return None, None


def mtime_capture(mtime_ns: int) -> CaptureTime:
    """A file's modification time (nanoseconds since the epoch) as a capture time in the local zone."""
    seconds, ns = divmod(int(mtime_ns), 1_000_000_000)
    when = datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=ns // 1000)
    return CaptureTime(when.astimezone(), "mtime")


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return (value.strip("\x00 ") or None) if isinstance(value, str) else None


def parse_exif_date(text: str | None) -> datetime | None:
    """An EXIF date text ('YYYY:MM:DD HH:MM:SS') as a naive datetime; None when it is not a valid date."""
    match = _DATE.match(text or "")
    if match is None:
        return None
    try:
        return datetime(*map(int, match.groups()))
    except ValueError:  # 0000:00:00 00:00:00, month 13, ...: a camera whose clock was never set
        return None


def _parse_offset(text: str | None) -> timezone | None:
    match = _OFFSET.fullmatch(text or "")
    if match is None or int(match[2]) > 23 or int(match[3]) > 59:
        return None
    delta = timedelta(hours=int(match[2]), minutes=int(match[3]))
    return timezone(-delta if match[1] == "-" else delta)


def exif_block(orient: int, dates: dict[int, str]) -> bytes:
    """A minimal EXIF block (``img.info["exif"]``) with an orientation and date tags (``DATE_TAGS`` members):
    what camera RAW decoding attaches to its image, so that ``upright`` and ``exif_date`` read it as any
    other format's."""
    exif = Image.Exif()
    exif[ORIENTATION] = orient
    for tag, text in dates.items():
        (exif.get_ifd(EXIF_IFD) if tag in _IN_EXIF_IFD else exif)[tag] = text
    return exif.tobytes()
