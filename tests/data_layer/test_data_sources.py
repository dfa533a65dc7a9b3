"""Source readers: CSV/TSV, caption folders, WebDataset shards, builtin; bad samples skipped and counted."""
import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from clipforge.data import (BadSample, BuiltinSource, CsvSource, DataSourceError, FolderSource, ShardSource, SkipCounter,
                            iter_pairs, load_image, open_sources, write_shapes)
from clipforge.data.sources import source_kind


def png(i: int, side: int = 16) -> bytes:
    """A small PNG whose pixels encode ``i``."""
    pixels = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height with no pixel data: enough for PIL's size check."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# name -> (image bytes or None for a missing file, caption bytes, expected reason or None)
BAD = {
    "corrupt": (b"this is not an image at all", b"corrupt", "unreadable_image"),
    "truncated": (png(900, 32)[:400], b"truncated", "unreadable_image"),
    "zero": (b"", b"zero bytes", "empty_file"),
    "missing": (None, b"missing", "missing_file"),
    "nocaption": (png(901), b"   ", "empty_caption"),
    "latin1": (png(902), "caf\xe9 cr\xe8me".encode("latin-1"), "caption_not_utf8"),
    "large": (png(903, 64), b"too many pixels", "too_many_pixels"),
}
MAX_PIXELS = 40 * 40  # good images are 16 x 16, "large" is 64 x 64
EXPECTED = {"unreadable_image": 2, "empty_file": 1, "missing_file": 1, "empty_caption": 1,
            "caption_not_utf8": 1, "too_many_pixels": 1}


def write_csv_dataset(folder, n_good: int, bad=BAD, sep=b",", header=b"filepath,caption"):
    """images/ + data.csv with relative paths; good captions are "good <i>"."""
    (folder / "images").mkdir(parents=True)
    rows = [header.replace(b",", sep)]
    items = [(f"g{i}", png(i), f"good {i}".encode(), None) for i in range(n_good)] + \
            [(name, *spec) for name, spec in bad.items()]
    for name, image, caption, _ in items:
        if image is not None:
            (folder / "images" / f"{name}.png").write_bytes(image)
        rows.append(f"images/{name}.png".encode() + sep + caption)
    path = folder / ("data.tsv" if sep == b"\t" else "data.csv")
    path.write_bytes(b"\n".join(rows) + b"\n")
    return str(path)


def write_tar(path, samples):
    """samples: (key, {ext: bytes}) pairs, written in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def bad_tar_samples():
    samples = [(name, {"png": image, "txt": caption}) for name, (image, caption, _) in BAD.items()
               if image is not None]
    samples += [("noimage", {"txt": b"no image here"}), ("notxt", {"png": png(904)})]
    return samples


def test_csv_relative_paths_from_any_working_directory(tmp_path, monkeypatch):
    spec = write_csv_dataset(tmp_path / "d", 5, bad={})
    monkeypatch.chdir(tmp_path)
    pairs = list(iter_pairs(spec))
    assert [c for _, c in pairs] == [f"good {i}" for i in range(5)]
    assert pairs[2][0].mode == "RGB" and pairs[2][0].tobytes() == Image.open(io.BytesIO(png(2))).tobytes()


def test_tsv_with_custom_columns(tmp_path):
    spec = write_csv_dataset(tmp_path, 4, bad={}, sep=b"\t", header=b"image,text")
    assert [c for _, c in iter_pairs(spec, csv_img_key="image", csv_caption_key="text")] == \
        [f"good {i}" for i in range(4)]
    with pytest.raises(ValueError, match=r"no column 'filepath'.*\['image', 'text'\]"):
        list(iter_pairs(spec))


def test_folder_of_image_and_text_pairs_recursive(tmp_path):
    for i, sub in enumerate(["a", "a/b", "c", "c"]):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / f"x{i}.png").write_bytes(png(i))
        (tmp_path / sub / f"x{i}.txt").write_text(f"caption {i}")
    (tmp_path / "c" / "lonely.png").write_bytes(png(9))
    counter = SkipCounter()
    assert sorted(c for _, c in iter_pairs(str(tmp_path), counter=counter)) == [f"caption {i}" for i in range(4)]
    assert counter.by_reason() == {"missing_caption": 1}
    assert source_kind(str(tmp_path)) == "folder"


def test_webdataset_shards_with_brace_expansion_and_folder(tmp_path):
    spec = write_shapes(tmp_path, 23, fmt="wds", image_size=16, samples_per_shard=5)
    assert spec == f"{tmp_path}/{{00000..00004}}.tar"
    source = open_sources(spec)[0]
    assert isinstance(source, ShardSource) and len(source.urls) == 5 and source.size() == 23
    from_folder = [c for _, c in iter_pairs(str(tmp_path))]  # a folder holding only shards
    assert [c for _, c in iter_pairs(spec)] == from_folder and len(from_folder) == 23
    assert [c for _, c in iter_pairs(f"{tmp_path}/{{00001,00003}}.tar")] == from_folder[5:10] + from_folder[15:20]
    (tmp_path / "sizes.json").unlink()
    assert ShardSource(spec).size() == 23  # counted from the tar headers


def test_builtin_and_mixed_sources(tmp_path):
    csv_spec = write_csv_dataset(tmp_path, 3, bad={})
    sources = open_sources(f"builtin:7::{csv_spec}::builtin", builtin_samples=11)
    assert [type(s) for s in sources] == [BuiltinSource, CsvSource, BuiltinSource]
    assert [len(s) for s in sources] == [7, 3, 11]
    assert len(list(iter_pairs(f"builtin:4::{csv_spec}"))) == 7
    with pytest.raises(ValueError, match="builtin:N"):
        open_sources("builtin:many")


def test_csv_bad_samples_are_skipped_and_counted(tmp_path):
    spec = write_csv_dataset(tmp_path, 20, bad=BAD)
    counter = SkipCounter()
    pairs = list(iter_pairs(spec, counter=counter, max_pixels=MAX_PIXELS))
    assert sorted(c for _, c in pairs) == sorted(f"good {i}" for i in range(20))
    assert counter.by_reason() == EXPECTED
    assert counter.seen[spec] == 27


def test_webdataset_bad_samples_are_skipped_and_counted(tmp_path):
    good = [(f"g{i}", {"png": png(i), "txt": f"good {i}".encode(), "json": b"{}"}) for i in range(20)]
    write_tar(tmp_path / "00000.tar", good[:10] + bad_tar_samples())
    write_tar(tmp_path / "00001.tar", good[10:])
    counter = SkipCounter()
    pairs = list(iter_pairs(f"{tmp_path}/{{00000..00001}}.tar", counter=counter, max_pixels=MAX_PIXELS))
    assert [c for _, c in pairs] == [f"good {i}" for i in range(20)]
    expected = dict(EXPECTED, missing_image=1, missing_caption=1)
    del expected["missing_file"]
    assert counter.by_reason() == dict(sorted(expected.items()))


def test_truncated_shard_is_counted_and_reading_goes_on(tmp_path):
    write_tar(tmp_path / "a.tar", [(f"a{i}", {"png": png(i), "txt": b"a"}) for i in range(6)])
    write_tar(tmp_path / "b.tar", [(f"b{i}", {"png": png(i), "txt": b"b"}) for i in range(6)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2 + 700])  # cut inside a member
    counter = SkipCounter()
    captions = [c for _, c in iter_pairs(f"{tmp_path}/{{a,b}}.tar", counter=counter)]
    assert captions[-6:] == ["b"] * 6 and 0 < captions.count("a") < 6
    assert counter.by_reason()["unreadable_shard"] == 1


def test_default_pixel_limit_is_pils():
    with pytest.raises(BadSample) as error:
        load_image(huge_png_header(20_000, 20_000), name="huge.png")
    assert error.value.reason == "too_many_pixels" and "huge.png" in str(error.value)
    with pytest.raises(BadSample) as error:
        load_image(huge_png_header(10_000, 9_000), name="big.png")  # above 89,478,485 but below PIL's error level
    assert error.value.reason == "too_many_pixels"


def test_mostly_bad_source_stops_with_a_clear_error(tmp_path):
    missing = {f"m{i}": (None, b"gone", "missing_file") for i in range(25)}
    spec = write_csv_dataset(tmp_path / "a", 10, bad=missing)
    with pytest.raises(DataSourceError, match=r"data.csv' is mostly bad: 11 of 21 samples .*missing_file: 11"):
        list(iter_pairs(spec))
    empty = {f"e{i}": (png(i), b"", "empty_caption") for i in range(25)}
    spec = write_csv_dataset(tmp_path / "b", 10, bad=empty)
    with pytest.raises(DataSourceError, match="empty_caption: 25"):  # found while indexing the CSV
        open_sources(spec)


def test_unknown_and_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CSV/TSV file.*no such file"):
        open_sources(str(tmp_path / "nothing"))
    write_tar(tmp_path / "s0.tar", [])
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shards .* do not exist"):
        open_sources(f"{tmp_path}/s{{0..2}}.tar")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        open_sources(str(tmp_path / "empty.csv"))
    (tmp_path / "nothing_here").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderSource(str(tmp_path / "nothing_here"))
