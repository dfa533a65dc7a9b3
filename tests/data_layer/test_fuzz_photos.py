"""Fuzzing the phone and camera readers (issue 24) like the other decoders (test_fuzz_files): mutated HEIC,
AVIF, DNG and EXIF-carrying JPEG files, hostile EXIF values and blocks, and headers claiming huge images give
a BadSample with a reason or a capture time from the mtime, never another error, a hang or unbounded memory
(measured in a child process)."""
import os
import re
import struct
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import photo_files as pf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_fuzz_files import mutate, mutations

from clipforge.data import BadSample, CaptureTime, camera, capture_time, image_info, load_image, upright
from clipforge.data.exif import exif_date, orientation, read_exif

pytest.importorskip("pillow_heif")
pytest.importorskip("rawpy")

DATES = {pf.DATE_TIME_ORIGINAL: "2024:05:06 07:08:09", pf.OFFSET_TIME_ORIGINAL: "+02:00", pf.SUBSEC_TIME_ORIGINAL: "5"}


def _photos() -> dict[str, bytes]:
    picture = pf.picture(48, 32)
    out = {fmt: pf.encode(picture, fmt, pf.exif_bytes(6, DATES)) for fmt in ("JPEG", "HEIF", "AVIF")}
    out["DNG"] = pf.dng(picture, 6, dates=DATES)
    out["DNG+preview"] = pf.dng(picture, 6, preview=picture, dates=DATES)
    return out


PHOTOS = _photos()
NAMES = {"JPEG": "m.jpg", "HEIF": "m.heic", "AVIF": "m.avif", "DNG": "m.dng", "DNG+preview": "m.dng"}
REASONS = ("empty_file", "unreadable_image", "too_many_pixels")
FUZZ = settings(max_examples=150, deadline=None)


@FUZZ
@given(fmt=st.sampled_from(sorted(PHOTOS)), edits=mutations, named=st.booleans())
def test_mutated_photos_raise_only_bad_sample(fmt, edits, named):
    name = NAMES[fmt] if named else None  # without a name, the format is told from the bytes alone
    try:
        img = load_image(mutate(PHOTOS[fmt], edits), name=name)
    except BadSample as bad:
        assert bad.reason in REASONS and (name or "<bytes>") in str(bad)
        return
    assert img.width * img.height <= 89_478_485 and orientation(read_exif(img)) == 1  # upright, nothing pending


@FUZZ
@given(fmt=st.sampled_from(sorted(PHOTOS)), edits=mutations)
def test_mutated_photos_always_have_a_capture_time(fmt, edits):
    found = capture_time(mutate(PHOTOS[fmt], edits), 1_700_000_000_000_000_000)
    assert isinstance(found, CaptureTime) and found.source in ("exif", "mtime")
    if found.source == "exif":
        assert isinstance(found.when, datetime)


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from([b"", b"II*\0", b"MM\0*", b"II*\0\x08\0\0\0", b"\0\0\0\x18ftyp", b"\0\0\0\xffftyp"]),
       tail=st.binary(max_size=200))
def test_telling_formats_apart_takes_any_bytes(prefix, tail):
    assert camera.kind(prefix + tail, "<bytes>") in (None, "heif", "avif", "raw")


ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
dates = st.one_of(ascii_text, st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31)).map(
    lambda d: d.strftime("%Y:%m:%d %H:%M:%S").rjust(19, "0")))
offsets = st.one_of(ascii_text, st.builds(lambda s, h, m: f"{s}{h:02d}:{m:02d}", st.sampled_from("+-"),
                                          st.integers(0, 99), st.integers(0, 99)))


@settings(max_examples=200, deadline=None)
@given(turn=st.integers(0, 65535), date=dates, offset=offsets, subsec=ascii_text)
def test_hostile_exif_values_never_break_decoding(turn, date, offset, subsec):
    exif = pf.exif_bytes(turn, {pf.DATE_TIME_ORIGINAL: date, pf.OFFSET_TIME_ORIGINAL: offset,
                                       pf.SUBSEC_TIME_ORIGINAL: subsec})
    picture = pf.picture(48, 32)
    img = load_image(pf.encode(picture, "JPEG", exif), name="hostile.jpg")
    assert img.size == (picture.size if turn not in range(5, 9) else picture.size[::-1])
    taken, when = exif_date(img.getexif())
    try:  # the EXIF form, checked independently of clipforge's parser
        valid = datetime.strptime(date.strip(), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        valid = None
    valid = valid if re.fullmatch(r"\d{4}:\d\d:\d\d \d\d:\d\d:\d\d", date.strip()) else None
    if valid is not None:
        assert taken == date.strip() and when.replace(tzinfo=None, microsecond=0) == valid
    assert image_info(img).captured == when


@settings(max_examples=200, deadline=None)
@given(block=st.binary(max_size=300), header=st.sampled_from([b"", b"Exif\0\0", b"Exif\0\0II*\0", b"MM\0*"]))
def test_random_exif_blocks_read_as_absent_not_as_errors(block, header):
    img = Image.new("RGB", (6, 4))
    img.info["exif"] = header + block
    turned = upright(img)
    assert turned.size in ((6, 4), (4, 6))
    assert isinstance(image_info(turned).width, int)
    found = capture_time(turned, 0)
    assert found.source in ("exif", "mtime")


def _with_box_size(data: bytes, box: bytes, width: int, height: int) -> bytes:
    at = data.index(box) + 8  # box type, then version and flags
    return data[:at] + struct.pack(">II", width, height) + data[at + 8:]


def _with_tiff_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    for tag, value in ((256, width), (257, height)):
        at = out.index(struct.pack("<HHI", tag, 4, 1))  # the raw directory's ImageWidth / ImageLength
        out[at + 8:at + 12] = struct.pack("<I", value)
    return bytes(out)


@pytest.mark.parametrize("width, height, heic, dng", [
    (60000, 60000, "too_many_pixels", "too_many_pixels"),
    (20000, 20000, "too_many_pixels", "too_many_pixels"),
    (9000, 9000, "unreadable_image", "unreadable_image"),  # under the limit: the data is not there
    (1, 1 << 30, "too_many_pixels", "unreadable_image"),  # a height LibRaw itself refuses to parse
])
def test_headers_claiming_huge_images_are_refused_at_once(width, height, heic, dng):
    square = pf.encode(pf.picture(64, 64), "HEIF")  # coded at its own size: no clean-aperture crop
    for name, data, reason in (("huge.heic", _with_box_size(square, b"ispe", width, height), heic),
                               ("huge.dng", _with_tiff_size(PHOTOS["DNG"], width, height), dng)):
        start = time.perf_counter()
        with pytest.raises(BadSample, match=name) as bad:
            load_image(data, name=name)
        assert bad.value.reason == reason and time.perf_counter() - start < 2


_MEMORY_PROBE = r"""
import random, resource, sys
sys.path.insert(0, sys.argv[1])
import test_fuzz_photos as fuzz
from clipforge.data import BadSample, capture_time, load_image
rng = random.Random(7)
def edits():
    return [(rng.choice(["flip", "header", "cut"]), rng.random(), rng.randrange(1, 256))
            for _ in range(rng.randrange(1, 6))]
for data in fuzz.PHOTOS.values():  # warm up every reader once
    load_image(data)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i in range(500):
    fmt = rng.choice(sorted(fuzz.PHOTOS))
    data = fuzz.mutate(fuzz.PHOTOS[fmt], edits())
    try:
        load_image(data, name=fuzz.NAMES[fmt] if i % 2 else None)
    except BadSample:
        pass
    capture_time(data, 0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_memory_and_time_stay_bounded_over_many_mutated_photos():
    """A child process decodes 500 mutated HEIC/AVIF/DNG/JPEG files and reads their capture times, within
    the timeout (no hang), its peak RSS growing by at most 200 MiB."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) < 200, done.stdout
