"""Phone and camera formats through the one decoder (issue 24): HEIC, AVIF and DNG decode to the same picture
as a PNG of it, EXIF orientations 1-8 come out alike for every format, RAW files use their preview only when
it is large enough, the pixel limit holds before decoding, and without the photos extra a file is a skip
whose reason names the extra."""
import io
import sys

import numpy as np
import photo_files as pf
import pytest
from PIL import Image

from clipforge.data import (
    IMAGE_EXTENSIONS,
    REASONS,
    BadSample,
    DescribedImages,
    camera,
    image_info,
    is_image_name,
    list_images,
    load_image,
)

pytest.importorskip("pillow_heif")
pytest.importorskip("rawpy")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def assert_looks_like(img: Image.Image, expected: np.ndarray):
    """Lossy codecs and demosaicing blur sharp edges: close on average, and few pixels far off."""
    got = pixels(img)
    assert got.shape == expected.shape
    error = np.abs(got - expected)
    assert error.mean() < 2.0 and (error.max(-1) > 24).mean() < 0.03, (error.mean(), (error.max(-1) > 24).mean())


def shown(stored: np.ndarray, orientation: int) -> np.ndarray:
    """How EXIF 2.32 says a picture stored as ``stored`` with tag ``orientation`` is shown, by numpy alone."""
    transpose = stored.transpose(1, 0, 2)
    return {1: stored, 2: stored[:, ::-1], 3: stored[::-1, ::-1], 4: stored[::-1], 5: transpose,
            6: np.rot90(stored, -1), 7: transpose[::-1, ::-1], 8: np.rot90(stored, 1)}[orientation]


def photo(fmt: str, img: Image.Image, orientation: int | None = None, **dng_options) -> bytes:
    if fmt == "DNG":
        return pf.dng(img, orientation or 1, **dng_options)
    return pf.encode(img, fmt, pf.exif_bytes(orientation) if orientation else b"")


ALL = (*pf.FORMATS, "DNG")


@pytest.mark.parametrize("fmt", ALL)
def test_every_format_decodes_to_the_picture(fmt):
    picture = pf.picture()
    img = load_image(photo(fmt, picture), name="photo" + pf.SUFFIX[fmt])
    assert_looks_like(img, pixels(picture))
    assert (image_info(img).width, image_info(img).height) == picture.size


def test_a_dng_with_a_full_size_preview_decodes_to_the_preview():
    picture, preview = pf.picture(), Image.fromarray(255 - np.asarray(pf.picture()))  # the preview is a negative
    img = load_image(pf.dng(picture, preview=preview), name="photo.dng")
    assert_looks_like(img, pixels(preview))


def test_a_small_preview_gives_way_to_demosaicing_unless_a_draft_allows_it():
    picture = pf.picture()
    preview = Image.fromarray(255 - np.asarray(picture)).resize((48, 32))  # half size: below the 64-pixel side
    data = pf.dng(picture, preview=preview)
    assert_looks_like(load_image(data, name="photo.dng"), pixels(picture))
    drafted = load_image(data, name="photo.dng", draft_size=32)
    assert_looks_like(drafted, pixels(preview))
    assert drafted.size == (48, 32) and (image_info(drafted).width, image_info(drafted).height) == (96, 64)


def test_a_letterboxed_preview_is_not_used():
    picture = pf.picture()
    letterbox = Image.new("RGB", (96, 72))
    letterbox.paste(Image.fromarray(255 - np.asarray(picture)), (0, 4))
    assert_looks_like(load_image(pf.dng(picture, preview=letterbox), name="photo.dng"), pixels(picture))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_alike_for_every_format(orientation):
    picture = pf.picture()
    expected = shown(pixels(picture), orientation)
    for fmt in ALL:
        img = load_image(photo(fmt, picture, orientation), name="photo" + pf.SUFFIX[fmt])
        assert_looks_like(img, expected)
        assert (image_info(img).width, image_info(img).height) == expected.shape[1::-1]
        assert img.getexif().get(0x0112, 1) == 1, fmt  # applied once: a second pass changes nothing
    preview = photo("DNG", picture, orientation, preview=picture)
    assert_looks_like(load_image(preview, name="photo.dng"), expected)


def test_a_raw_preview_follows_the_raw_orientation_not_its_own_tag():
    picture = pf.picture()
    data = pf.dng(picture, orientation=6, preview=picture, preview_exif=pf.exif_bytes(3))
    assert_looks_like(load_image(data, name="photo.dng"), shown(pixels(picture), 6))


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF", "DNG"])
def test_draft_decoding_keeps_the_upright_full_size(fmt):
    big = pf.picture(384, 256)
    img = load_image(photo(fmt, big, 6, preview=big) if fmt == "DNG" else photo(fmt, big, 6),
                     name="photo" + pf.SUFFIX[fmt], draft_size=64)
    assert min(img.size) >= 64 and img.width < img.height
    assert (image_info(img).width, image_info(img).height) == (256, 384)


def test_the_pixel_limit_holds_before_any_decoding(monkeypatch):
    from pillow_heif import as_plugin

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(as_plugin._LibHeifImageFile, "load", no_decoding)
    monkeypatch.setattr(camera, "_preview", no_decoding)  # LibRaw's types cannot be patched: its two decoders
    monkeypatch.setattr(camera, "_demosaic", no_decoding)
    picture = pf.picture()
    for fmt in ("HEIF", "DNG"):
        with pytest.raises(BadSample, match=r"photo\..*max_pixels=6000") as bad:
            load_image(photo(fmt, picture, preview=picture), name="photo" + pf.SUFFIX[fmt], max_pixels=6000)
        assert bad.value.reason == "too_many_pixels"


def test_without_the_photos_extra_a_file_is_skipped_naming_the_extra(monkeypatch, tmp_path):
    picture = pf.picture()
    files = {"a.heic": photo("HEIF", picture), "b.dng": photo("DNG", picture), "c.avif": photo("AVIF", picture),
             "d.png": photo("PNG", picture)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "rawpy", None)
    monkeypatch.setattr(camera, "_ready", set())
    monkeypatch.setattr(camera.features, "check", lambda feature: feature != "avif")  # a Pillow without AVIF
    for name in ("a.heic", "b.dng", "c.avif"):
        with pytest.raises(BadSample, match=r"clipforge\[photos\]") as bad:
            load_image(tmp_path / name)
        assert bad.value.reason == "missing_extra" and name in str(bad.value)
    assert "clipforge[photos]" in REASONS["missing_extra"]
    items = [DescribedImages(list_images(tmp_path), lambda img: img)[i] for i in range(4)]
    assert [item[3][0] if item[3] else None for item in items] == ["missing_extra"] * 3 + [None]


def test_folder_listing_finds_phone_and_camera_photos(tmp_path):
    names = ["IMG_0001.HEIC", "a.heif", "b.avif", "c.dng", "d.CR2", "e.cr3", "f.nef", "g.arw", "h.raf", "i.orf",
             "j.rw2", "k.jpg", ".hidden.heic", "notes.txt", "clip.mp4"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert [p.split("/")[-1] for p in list_images(tmp_path)] == sorted(names[:12])
    assert all(is_image_name(f"x{ext}") for ext in IMAGE_EXTENSIONS)


def test_formats_are_told_apart_by_their_bytes():
    picture = pf.picture()
    assert camera.kind(photo("HEIF", picture)[:4096], "<bytes>") == "heif"
    assert camera.kind(photo("AVIF", picture)[:4096], "<bytes>") == "avif"
    assert camera.kind(photo("DNG", picture)[:4096], "<bytes>") == "raw"
    assert camera.kind(b"\0\0\0\x18ftypcrx \0\0\0\x01crx isom", "<bytes>") == "raw"  # Canon CR3
    assert camera.kind(b"II*\0\x10\0\0\0CR\x02\0" + b"\0" * 32, "<bytes>") == "raw"  # Canon CR2
    assert camera.kind(b"IIRO\x08\0\0\0" + b"\0" * 32, "<bytes>") == "raw"  # Olympus ORF
    assert camera.kind(b"\0\0\0\x18ftypisom\0\0\x02\0isommp41", "<bytes>") is None  # an MP4 video
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert camera.kind(photo(fmt, picture)[:4096], "<bytes>") is None
    tiff = io.BytesIO()
    picture.save(tiff, "TIFF")
    assert camera.kind(tiff.getvalue()[:4096], "<bytes>") is None and camera.kind(b"", "a.NEF") == "raw"


def test_nameless_raw_bytes_and_misnamed_files_still_decode():
    picture = pf.picture()
    assert_looks_like(load_image(photo("DNG", picture)), pixels(picture))  # e.g. a thumbnail request
    assert_looks_like(load_image(photo("JPEG", picture), name="really_a_jpeg.nef"), pixels(picture))
    assert_looks_like(load_image(photo("JPEG", picture), name="really_a_jpeg.heic"), pixels(picture))
    with pytest.raises(BadSample, match="broken.nef: neither a camera RAW that LibRaw reads nor") as bad:
        load_image(b"x" * 5000, name="broken.nef")
    assert bad.value.reason == "unreadable_image"
    with pytest.raises(BadSample, match="camera RAW short.nef: LibRawIOError") as bad:
        load_image(b"too short", name="short.nef")
    assert bad.value.reason == "unreadable_image"
