"""Fuzzing the caption readers (issue 11): generated CSV rows and tar members give exactly the skip counts
that the documented rules predict, and damaged files raise only the documented error types."""
import csv
import io
import tarfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipforge.data import BadSample, DataSourceError, SkipCounter, iter_pairs, scan_tar
from clipforge.data.sources import CsvSource

HOSTILE = Path(__file__).parents[1] / "fixtures" / "hostile"
_buf = io.BytesIO()
Image.new("RGB", (8, 8), (1, 2, 3)).save(_buf, "PNG")
GOOD_PNG = _buf.getvalue()
IMAGES = {"good": GOOD_PNG, "empty": b"", "garbage": (HOSTILE / "not_an_image.jpg").read_bytes(),
          "truncated": (HOSTILE / "truncated.png").read_bytes()}
IMAGE_REASON = {"good": None, "empty": "empty_file", "garbage": "unreadable_image", "truncated": "unreadable_image",
                "missing": "missing_file", "no_path": "missing_file"}
# caption text: any Unicode but the multi-caption markers (a JSON list in a cell, the internal separator)
caption_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="[\x1e"), max_size=30)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _caption_reason(text: str | None) -> str | None:
    """The documented caption rule: none -> missing_caption, blank (after a BOM) -> empty_caption."""
    if text is None:
        return "missing_caption"
    return "empty_caption" if not text.lstrip("\ufeff").strip() else None


def _expected(rows) -> dict[str, int]:
    counts = {}
    for image, caption in rows:
        reason = "missing_file" if image == "no_path" else _caption_reason(caption) or IMAGE_REASON[image]
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


@FUZZ
@given(rows=st.lists(st.tuples(st.sampled_from(sorted(IMAGE_REASON)), st.one_of(st.none(), caption_text)),
                     max_size=25))
def test_csv_rows_give_the_documented_skip_counts(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("csv")
    lines = [["filepath", "caption"]]
    for i, (image, caption) in enumerate(rows):
        name = "" if image == "no_path" else f"img{i}.png"
        if image not in ("missing", "no_path"):
            (folder / name).write_bytes(IMAGES[image])
        lines.append([name] if caption is None else [name, caption])
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(lines)
    counter = SkipCounter(max_bad_fraction=1.0)
    pairs = list(iter_pairs(str(folder / "data.csv"), counter=counter))
    assert counter.by_reason() == _expected(rows)
    assert len(pairs) == sum(1 for image, caption in rows if image == "good" and not _caption_reason(caption))
    assert sum(counter.seen.values()) == len(rows)


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_as_a_csv_raise_only_documented_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "data.csv"
    path.write_bytes(b"filepath,caption\n" + data)
    try:
        source = CsvSource(str(path), counter=SkipCounter(max_bad_fraction=1.0))
        for i in range(len(source)):
            try:
                source.load(i)
            except BadSample:
                pass
    except ValueError:  # documented: a missing column, an empty file (BadSample and DataSourceError are ValueErrors)
        pass


MEMBER_KINDS = st.fixed_dictionaries({
    "image": st.sampled_from(["good", "empty", "garbage", "truncated", None]),
    "caption": st.one_of(st.none(), caption_text, st.just(b"\xff\xfe not utf-8")),
})


def _shard_reason(sample) -> str | None:
    """The documented order: no image member, then the caption, then decoding the image."""
    if sample["image"] is None:
        return "missing_image"
    caption = sample["caption"]
    if isinstance(caption, bytes):
        return "caption_not_utf8"
    return _caption_reason(caption) or IMAGE_REASON[sample["image"]]


def _write_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            members = {}
            if sample["image"] is not None:
                members["png"] = IMAGES[sample["image"]]
            if sample["caption"] is not None:
                caption = sample["caption"]
                members["txt"] = caption if isinstance(caption, bytes) else caption.encode("utf-8")
            members.setdefault("json", b"{}")  # a sample with neither still has a member
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@FUZZ
@given(samples=st.lists(MEMBER_KINDS, max_size=20))
def test_tar_members_give_the_documented_skip_counts(tmp_path_factory, samples):
    shard = tmp_path_factory.mktemp("wds") / "shard.tar"
    _write_shard(shard, samples)
    counter = SkipCounter(max_bad_fraction=1.0)
    pairs = list(iter_pairs(str(shard), counter=counter))
    expected = {}
    for sample in samples:
        if (reason := _shard_reason(sample)) is not None:
            expected[reason] = expected.get(reason, 0) + 1
    assert counter.by_reason() == dict(sorted(expected.items()))
    assert len(pairs) == sum(_shard_reason(s) is None for s in samples)
    assert len(scan_tar(shard)) == len(samples)


@FUZZ
@given(samples=st.lists(MEMBER_KINDS, min_size=1, max_size=8), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=6))
def test_a_damaged_shard_raises_only_documented_errors(tmp_path_factory, samples, cut, flips):
    shard = tmp_path_factory.mktemp("wds") / "shard.tar"
    _write_shard(shard, samples)
    data = bytearray(shard.read_bytes())
    for where, mask in flips:
        data[int(where * (len(data) - 1))] ^= mask
    shard.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    try:
        scan_tar(shard)
    except (tarfile.TarError, OSError):  # documented: unreadable from the start
        pass
    counter = SkipCounter(max_bad_fraction=1.0)
    try:
        pairs = list(iter_pairs(str(shard), counter=counter))
    except DataSourceError:
        return
    assert len(pairs) <= len(samples)
