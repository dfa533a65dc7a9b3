"""Capture times (issue 24): EXIF DateTimeOriginal with OffsetTimeOriginal where present, read the same way from
JPEG, PNG, WebP, HEIC, AVIF and DNG, from a decoded image or from the file's headers alone, and the file's
modification time when there is no valid EXIF date."""
import os
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import photo_files as pf
import pytest
from PIL import Image

from clipforge.data import BadSample, CaptureTime, MissingImage, camera, capture_time, image_info, load_image
from clipforge.data.exif import exif_date

pytest.importorskip("pillow_heif")
pytest.importorskip("rawpy")

ALL = (*pf.FORMATS, "DNG")
MTIME_NS = 1_700_000_000_123_456_789


def photo_file(folder, fmt: str, dates: dict[int, str], name: str = "photo"):
    picture = pf.picture()
    data = pf.dng(picture, dates=dates) if fmt == "DNG" else pf.encode(picture, fmt, pf.exif_bytes(None, dates))
    path = folder / (name + pf.SUFFIX[fmt])
    path.write_bytes(data)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return path


def mtime_time() -> datetime:
    return datetime.fromtimestamp(MTIME_NS // 10**9, timezone.utc).replace(microsecond=123456).astimezone()


def every_way(path) -> list:
    """The capture time from the file's headers, from the decoded image, and from its ImageInfo."""
    img = load_image(path)
    return [capture_time(path), capture_time(img, MTIME_NS), capture_time(image_info(img), MTIME_NS)]


@pytest.mark.parametrize("fmt", ALL)
def test_exif_date_with_offset_gives_an_aware_time(tmp_path, fmt):
    path = photo_file(tmp_path, fmt, {pf.DATE_TIME_ORIGINAL: "2024:05:06 07:08:09", pf.OFFSET_TIME_ORIGINAL: "-05:30",
                                      pf.SUBSEC_TIME_ORIGINAL: "25", pf.DATE_TIME: "2025:01:01 00:00:00"})
    expected = datetime(2024, 5, 6, 7, 8, 9, 250000, tzinfo=timezone(-timedelta(hours=5, minutes=30)))
    for found in every_way(path):
        assert found == CaptureTime(expected, "exif") and found.when.utcoffset() == expected.utcoffset()
    assert image_info(load_image(path)).taken == "2024:05:06 07:08:09"  # the stored text, as the index keeps it


@pytest.mark.parametrize("fmt", ALL)
def test_exif_date_without_offset_gives_the_camera_clock(tmp_path, fmt):
    path = photo_file(tmp_path, fmt, {pf.DATE_TIME_ORIGINAL: "2023:12:31 23:59:58"})
    for found in every_way(path):
        assert found == CaptureTime(datetime(2023, 12, 31, 23, 59, 58), "exif") and found.when.tzinfo is None


@pytest.mark.parametrize("fmt", ALL)
def test_no_exif_date_falls_back_to_the_mtime(tmp_path, fmt):
    path = photo_file(tmp_path, fmt, {})
    for found in every_way(path):
        assert found == CaptureTime(mtime_time(), "mtime") and found.when.tzinfo is not None
    assert image_info(load_image(path)).taken is None


def test_date_time_is_used_when_there_is_no_original(tmp_path):
    path = photo_file(tmp_path, "JPEG", {pf.DATE_TIME: "2020:02:29 12:00:00", pf.OFFSET_TIME: "+09:00"})
    assert capture_time(path) == CaptureTime(datetime(2020, 2, 29, 12, tzinfo=timezone(timedelta(hours=9))), "exif")


@pytest.mark.parametrize("dates, expected", [
    ({pf.DATE_TIME_ORIGINAL: "0000:00:00 00:00:00"}, None),  # a clock never set
    ({pf.DATE_TIME_ORIGINAL: "    :  :     :  :  "}, None),  # EXIF's "unknown"
    ({pf.DATE_TIME_ORIGINAL: "2021:13:01 10:00:00"}, None),  # no month 13
    ({pf.DATE_TIME_ORIGINAL: "yesterday", pf.DATE_TIME: "2019:07:04 01:02:03"}, datetime(2019, 7, 4, 1, 2, 3)),
    ({pf.DATE_TIME_ORIGINAL: "2022:03:04 05:06:07", pf.OFFSET_TIME_ORIGINAL: "+25:00"}, datetime(2022, 3, 4, 5, 6, 7)),
    ({pf.DATE_TIME_ORIGINAL: "2022-03-04T05:06:07", pf.OFFSET_TIME_ORIGINAL: "Z"}, datetime(2022, 3, 4, 5, 6, 7)),
])
def test_invalid_dates_and_offsets_are_ignored(tmp_path, dates, expected):
    path = photo_file(tmp_path, "JPEG", dates)
    found = capture_time(path)
    assert found == (CaptureTime(expected, "exif") if expected else CaptureTime(mtime_time(), "mtime"))


def test_reading_headers_decodes_no_pixels(tmp_path, monkeypatch):
    from PIL import ImageFile

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded pixels to read a date")

    paths = [photo_file(tmp_path, fmt, {pf.DATE_TIME_ORIGINAL: "2024:05:06 07:08:09"}, fmt) for fmt in ALL]
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(camera, "_preview", no_decoding)
    monkeypatch.setattr(camera, "_demosaic", no_decoding)
    from pillow_heif import as_plugin
    monkeypatch.setattr(as_plugin._LibHeifImageFile, "load", no_decoding)
    for path in paths:
        assert capture_time(path) == CaptureTime(datetime(2024, 5, 6, 7, 8, 9), "exif"), path


def test_bytes_without_an_mtime_and_missing_files(tmp_path):
    data = pf.encode(pf.picture(), "JPEG")
    assert capture_time(data) is None
    assert capture_time(data, MTIME_NS) == CaptureTime(mtime_time(), "mtime")
    assert capture_time(b"not an image", MTIME_NS).source == "mtime"
    with pytest.raises(MissingImage, match="gone.jpg"):
        capture_time(tmp_path / "gone.jpg")
    assert issubclass(MissingImage, BadSample)


def test_raws_that_are_not_tiff_take_libraw_time_and_orientation():
    """CR3, RAF, ORF and RW2 are not TIFF files Pillow can read: their date comes from LibRaw (seconds, no
    offset), their orientation from LibRaw's flip (dcraw's encoding: 5 is 90 degrees counter-clockwise)."""
    taken = datetime(2021, 6, 7, 8, 9, 10)
    raw = SimpleNamespace(sizes=SimpleNamespace(flip=5), other=SimpleNamespace(timestamp=taken))
    exif = Image.Exif()
    exif.load(camera._raw_exif(raw, b"FUJIFILMCCD-RAW 0201FF393101"))
    assert exif[0x0112] == 8 and exif_date(exif) == ("2021:06:07 08:09:10", datetime(2021, 6, 7, 8, 9, 10))
    raw.other.timestamp = datetime.fromtimestamp(0)  # LibRaw's "no date"
    exif.load(camera._raw_exif(raw, b""))
    assert exif[0x0112] == 8 and exif_date(exif) == (None, None)


def test_the_mtime_keeps_microseconds_and_the_local_zone():
    found = capture_time(b"", 1_600_000_000_999_999_000)
    assert found.when == datetime.fromtimestamp(1_600_000_000.999999).astimezone()
    assert found.when.microsecond == 999999 and found.isoformat() == found.when.isoformat()
