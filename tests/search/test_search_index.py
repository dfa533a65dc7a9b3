"""clipforge.search.Index end to end on generated images: build from a folder, CSV and shards; every stored
vector against a fresh encoding of its file; exact search against a direct computation; incremental
updates (added, changed, renamed, duplicated, deleted, bad files); another model's index refused."""
import io
import os
import tarfile
from datetime import datetime

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import load_image
from clipforge.encode import encode_images, encode_texts
from clipforge.search import Index, Query
from clipforge.search.model import load_model

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 200), (40, 210, 210),
           (250, 250, 250), (20, 20, 20), (250, 140, 20), (120, 70, 20)]


def make_image(i: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(i)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(COLOURS[i % len(COLOURS)], dtype=np.uint8)
    pixels = np.clip(pixels.astype(int) + rng.integers(-30, 30, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_folder(folder, count: int, start: int = 0) -> list[str]:
    paths = []
    for i in range(start, start + count):
        sub = folder / ("deep" if i % 3 == 0 else "") / f"img{i:03d}.{'png' if i % 4 == 0 else 'jpg'}"
        sub.parent.mkdir(parents=True, exist_ok=True)
        make_image(i, (40 + i % 7 * 9, 36 + i % 5 * 7)).save(sub)
        paths.append(str(sub))
    return paths


def write_shard(path, start: int, count: int, captions=True) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            buffer = io.BytesIO()
            make_image(i).save(buffer, format="JPEG")
            members = [(f"{i:06d}.jpg", buffer.getvalue())]
            if captions:
                members.append((f"{i:06d}.txt", f"a photo of colour {i % len(COLOURS)}".encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def fresh_vectors(index: Index, ids) -> np.ndarray:
    """Each item's image encoded again from its stored bytes, with the index's own model: (N, dim)."""
    model, preprocess = load_model(index.config["model"], "cpu", index.config.get("random_init", False))
    batch = torch.stack([preprocess(load_image(index.image_bytes(i))) for i in ids])
    return encode_images(model, batch).numpy()


def stored_vectors(index: Index, ids, kind="images") -> np.ndarray:
    return index.vectors(ids, captions=kind == "captions")


def assert_every_vector_matches_its_file(index: Index) -> None:
    ids = [int(i) for i in index.ids()]
    np.testing.assert_allclose(stored_vectors(index, ids), fresh_vectors(index, ids), atol=2e-3)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    write_folder(folder, 12)
    (folder / ".hidden").mkdir()
    make_image(99).save(folder / ".hidden" / "secret.jpg")
    (folder / "skipme").mkdir()
    make_image(98).save(folder / "skipme" / "x.jpg")
    return folder


def _build(where, sources, model="tiny-vit", **options):  # photos/skipme is indexed unless excluded
    return Index.build(where, sources, model=model, workers=0, batch_size=5, progress=False,
                       random_init=model == "tiny-vit", **options)


def test_folder_index_holds_every_image_once_with_its_own_vector(tmp_path, index_at, photos, one_thread):
    index = _build(index_at, [photos], exclude=["skipme"])
    assert index.last_update["indexed"] == 12 and len(index) == 12
    paths = sorted(index.item(i).path for i in index.ids())
    assert paths == sorted(str(p) for p in photos.rglob("img*"))
    assert_every_vector_matches_its_file(index)
    first = index.item(int(index.ids()[0]))
    assert (first.width, first.height) == Image.open(first.path).size
    assert index.image_bytes(first.id) == open(first.path, "rb").read()
    with pytest.raises(KeyError):
        index.item(10_000)
    with pytest.raises(KeyError):
        index.image_bytes(10_000)


def test_exact_search_equals_a_direct_computation(tmp_path, index_at, photos, one_thread):
    index = _build(index_at, [photos])
    ids = [int(i) for i in index.ids()]
    vectors = stored_vectors(index, ids)
    model, _ = load_model("tiny-vit", "cpu", random_init=True)
    text = encode_texts(model, ["a red photo"])[0].numpy()
    by_id = vectors[ids.index(3)]
    combined = text - 0.5 * by_id
    combined /= np.linalg.norm(combined)
    for query, vector in [("a red photo", text), ("a red photo - 0.5:id:3", combined)]:
        expected = np.argsort(-(vectors @ vector), kind="stable")[:5]
        results = index.search(query, top_k=5)
        assert [r.id for r in results] == [ids[j] for j in expected]
        np.testing.assert_allclose([r.score for r in results], (vectors @ vector)[expected], atol=1e-5)
    page = index.search("a red photo", top_k=3, offset=2)
    assert [r.id for r in page] == [r.id for r in index.search("a red photo", top_k=5)][2:5]
    assert index.search(Query.from_terms([("id", 3)]), top_k=1)[0].id == 3


def test_search_by_image_file_and_bytes(tmp_path, index_at, photos, one_thread):
    index = _build(index_at, [photos])
    path = index.item(5).path
    assert index.search(path, top_k=1)[0].id == 5
    hit = index.search(Query.from_terms([{"bytes": open(path, "rb").read()}]), top_k=1)[0]
    assert hit.id == 5 and hit.score == pytest.approx(1.0, abs=2e-3)


def test_filters_folder_min_score_and_dedup(tmp_path, index_at, photos, one_thread):
    index = _build(index_at, [photos])
    deep = index.search("a photo", top_k=20, folder=str(photos / "deep"))
    assert deep and all("/deep/" in r.path for r in deep)
    assert len(deep) == sum(1 for _ in (photos / "deep").iterdir())
    everything = index.search("a photo", top_k=20)
    threshold = everything[3].score
    assert [r.id for r in index.search("a photo", top_k=20, min_score=threshold)] == [r.id for r in everything[:4]]
    kept = index.search("a photo", top_k=20, dedup=0.9)
    vectors = stored_vectors(index, [r.id for r in kept])
    similarity = vectors @ vectors.T
    assert np.all(similarity[np.triu_indices(len(kept), 1)] < 0.9)
    for r in everything:  # every dropped hit is close to a better kept one
        if r.id not in {k.id for k in kept}:
            v = stored_vectors(index, [r.id])[0]
            assert any(float(stored_vectors(index, [k.id])[0] @ v) >= 0.9 for k in kept if k.score >= r.score)


def test_update_after_adding_changing_renaming_duplicating_and_deleting(tmp_path, index_at, photos, one_thread):
    index = _build(index_at, [photos])
    again = _build(index_at, [photos])
    assert again.last_update == {"indexed": 0, "updated": 0, "reused": 0, "unchanged": 13, "removed": 0,
                                 "skipped": {}, "items": 13}
    by_path = {index.item(i).path: index.item(i) for i in index.ids()}
    renamed = photos / "img001.jpg"
    os.rename(renamed, photos / "renamed.jpg")
    (photos / "copy.jpg").write_bytes((photos / "img002.jpg").read_bytes())
    os.remove(photos / "img005.jpg")
    make_image(50).save(photos / "img007.jpg")  # changed content
    write_folder(photos / "new", 2, start=20)
    updated = Index.open(index_at)
    assert updated.last_update is None
    updated.update([photos], workers=0, batch_size=5, progress=False)
    assert updated.last_update == {"indexed": 4, "updated": 1, "reused": 2, "unchanged": 10, "removed": 2,
                                   "skipped": {}, "items": 15}
    assert updated.item(by_path[str(photos / "img007.jpg")].id).hash != by_path[str(photos / "img007.jpg")].hash
    assert_every_vector_matches_its_file(updated)


def test_float32_copies_search_as_the_files_and_follow_updates(tmp_path, photos, one_thread):  # a folder's
    plain = _build(tmp_path / "index", [photos])
    copied = Index.open(tmp_path / "index", float32_mib=64)
    for query in ("a red photo", "a green photo - 0.3:id:2"):
        a, b = plain.search(query, top_k=8), copied.search(query, top_k=8)
        assert [r.id for r in a] == [r.id for r in b]
        np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-6)
    assert copied.store.float32_bytes == len(plain) * plain.dim * 4
    write_folder(photos / "more", 3, start=30)
    plain.update([photos], workers=0, batch_size=5, progress=False)
    copied.refresh()
    vector = plain.encode_query("a red photo")
    assert [r.id for r in copied.search(vector, top_k=len(plain))] == [r.id for r in plain.search(vector, top_k=99)]
    assert copied.store.float32_bytes == len(plain) * plain.dim * 4  # the grown segment was copied again


def test_bad_files_are_skipped_by_reason_and_retried_only_when_changed(tmp_path, index_at, photos, one_thread):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.jpg").write_bytes(b"not an image at all")
    good = io.BytesIO()
    make_image(7, (200, 200)).save(good, format="JPEG")
    (photos / "truncated.jpg").write_bytes(good.getvalue()[:300])
    make_image(8, (300, 300)).save(photos / "huge.png")
    locked = photos / "locked.jpg"
    make_image(9).save(locked)
    locked.chmod(0)
    unreadable = os.geteuid() != 0
    index = _build(index_at, [photos], max_pixels=250 * 250)
    expected = {"empty_file": 1, "unreadable_image": 2, "too_many_pixels": 1}
    if unreadable:
        expected["unreadable_file"] = 1
    assert index.last_update["skipped"] == expected
    assert len(index) == 13 + (0 if unreadable else 1)
    again = _build(index_at, [photos], max_pixels=250 * 250)
    assert again.last_update["skipped"] == expected and again.last_update["indexed"] == 0
    (photos / "text.jpg").write_bytes((photos / "img002.jpg").read_bytes())
    fixed = _build(index_at, [photos], max_pixels=250 * 250)
    assert fixed.last_update["indexed"] == 1 and fixed.last_update["reused"] == 1
    locked.chmod(0o644)


def test_csv_and_shards_with_captions(tmp_path, index_at, photos, one_thread):
    table = tmp_path / "list.csv"
    table.write_text("filepath,caption\nphotos/img001.jpg,a green thing\nphotos/img002.jpg,\n"
                     ",orphan caption\nphotos/missing.jpg,gone\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "000.tar", 100, 4)
    write_shard(shards / "001.tar", 104, 3)
    index = _build(index_at, [table, str(shards / "{000..001}.tar")])
    assert index.last_update["indexed"] == 9 and index.last_update["skipped"] == {"missing_file": 2}
    assert_every_vector_matches_its_file(index)
    shard_item = next(index.item(i) for i in index.ids() if index.item(i).key == "000102")
    assert shard_item.caption == "a photo of colour 2" and shard_item.location.endswith("000.tar:000102")
    model, _ = load_model("tiny-vit", "cpu", random_init=True)
    captioned = [int(i) for i in index.ids(captions=True)]
    assert len(captioned) == 8
    texts = [index.item(i).caption for i in captioned]
    np.testing.assert_allclose(stored_vectors(index, captioned, "captions"), encode_texts(model, texts).numpy(),
                               atol=2e-3)
    hits = index.search("a photo of colour 2", top_k=1, captions=True)
    assert hits[0].caption == "a photo of colour 2"
    assert _build(index_at, [table, str(shards / "{000..001}.tar")]).last_update["unchanged"] == 9


def _stored_state(where):
    """What the index holds: a folder's files (but the SQLite database, which a read may touch), or a table's
    configuration, items and vectors."""
    if isinstance(where, str):
        with Index.open(where) as index:
            ids = index.ids()
            return index.config, [index.item(i) for i in ids], index.vectors(ids).tobytes()
    return {p.name: p.read_bytes() for p in where.iterdir() if p.is_file() and not p.name.startswith("metadata")}


def test_another_models_index_is_refused_naming_both(tmp_path, index_at, photos, one_thread):
    from clipforge.io.factory import create_model, save
    torch.manual_seed(1)
    other = save(create_model("tiny-vit"), tmp_path / "other-model")
    _build(index_at, [photos])
    with pytest.raises(ValueError, match=r"built with model tiny-vit .* not .*other-model.*--rebuild"):
        _build(index_at, [photos], model=other)
    rebuilt = _build(index_at, [photos], model=other, rebuild=True)
    assert rebuilt.last_update["indexed"] == 13 and rebuilt.config["model"] == str(other.resolve())
    # the same path with other weights: the checksum, settled once the data workers run, still refuses it
    # before anything is written
    before = _stored_state(index_at)
    torch.manual_seed(2)
    save(create_model("tiny-vit"), other)
    write_folder(photos / "more", 2, start=40)
    with pytest.raises(ValueError, match=r"built with model .*other-model \(weights sha256 .*\), not .*other-model"):
        _build(index_at, [photos], model=other)
    assert _stored_state(index_at) == before
    assert len(Index.open(index_at)) == 13


def _dated_photo(path, i: int, taken: str | None = None, offset: str | None = None) -> None:
    """A JPEG with EXIF DateTimeOriginal (and OffsetTimeOriginal) when given."""
    exif = Image.Exif()
    if taken is not None:
        sub = exif.get_ifd(0x8769)
        sub[0x9003] = taken
        if offset is not None:
            sub[0x9011] = offset
    make_image(i).save(path, exif=exif.tobytes())


def _dated_folder(folder):
    """Six photos: three with EXIF dates (one with its offset), three dated by mtime only."""
    folder.mkdir()
    _dated_photo(folder / "a.jpg", 1, "2021:05:04 10:00:00", "+02:00")
    _dated_photo(folder / "b.jpg", 2, "2022:12:31 23:30:00")
    _dated_photo(folder / "c.jpg", 3, "2023:07:01 08:15:00")
    for name, i, when in (("d.jpg", 4, "2020-01-15T12:00:00"), ("e.jpg", 5, "2022-06-01T09:00:00"),
                          ("f.jpg", 6, "2024-03-03T18:00:00")):
        _dated_photo(folder / name, i)
        stamp = datetime.fromisoformat(when).timestamp()  # this machine's local time
        os.utime(folder / name, (stamp, stamp))
    return {"a.jpg": "2021-05-04T10:00:00+02:00", "b.jpg": "2022-12-31T23:30:00", "c.jpg": "2023-07-01T08:15:00",
            "d.jpg": "2020-01-15T12:00:00", "e.jpg": "2022-06-01T09:00:00", "f.jpg": "2024-03-03T18:00:00"}


def test_capture_dates_filter_and_order_results(tmp_path, index_at, one_thread):
    expected = _dated_folder(tmp_path / "dated")
    index = _build(index_at, [tmp_path / "dated"])
    items = {os.path.basename(index.item(i).path): index.item(i) for i in index.ids()}
    for name, when in expected.items():
        assert items[name].captured[:len(when)] == when and len(items[name].captured) >= 19
        assert items[name].captured_from == ("exif" if name in ("a.jpg", "b.jpg", "c.jpg") else "mtime")
    assert items["a.jpg"].captured == "2021-05-04T10:00:00+02:00"  # the camera's offset kept
    wall = {name: when[:19] for name, when in expected.items()}
    for after, before in [("2021-01-01", "2023-01-01"), ("2022-06-01T09:00", None), (None, "2021-05-04T10:00:01")]:
        found = {os.path.basename(r.path) for r in index.search("a photo", top_k=20, after=after, before=before)}
        lo = after and (after + ":00")[:19] if after and "T" in after else (after and after + "T00:00:00")
        hi = before and ((before + ":00")[:19] if before.count(":") == 1 else before)
        assert found == {n for n, w in wall.items() if (lo is None or w >= lo) and (hi is None or w < hi)}, (after, before)
    newest = index.search("a photo", top_k=4, sort="date")
    assert [os.path.basename(r.path) for r in newest] == ["f.jpg", "c.jpg", "b.jpg", "e.jpg"]
    assert newest[0].captured.startswith("2024-03-03T18:00:00")
    page = index.search("a photo", top_k=2, offset=2, sort="date")
    assert [r.id for r in page] == [r.id for r in newest[2:4]]
    strict = index.search("a photo", top_k=20, sort="date", min_score=index.search("a photo", top_k=3)[-1].score)
    assert {r.id for r in strict} == {r.id for r in index.search("a photo", top_k=3)}
    assert [r.captured for r in strict] == sorted((r.captured for r in strict), key=lambda c: c[:19], reverse=True)
    with pytest.raises(ValueError, match="is not a date"):
        index.search("a photo", after="2024-13-01")
    with pytest.raises(ValueError, match="not earlier than before"):
        index.search("a photo", after="2024-01-01", before="2023-01-01")


def test_caption_filter_runs_with_the_search(tmp_path, index_at, photos, one_thread):
    table = tmp_path / "list.csv"
    table.write_text("filepath,caption\nphotos/img001.jpg,A Red Bicycle\nphotos/img002.jpg,a red car\n"
                     "photos/img005.jpg,a blue bicycle\nphotos/img007.jpg,\n")
    index = _build(index_at, [table])
    assert {r.caption for r in index.search("a photo", top_k=10, caption="bicycle")} == {"A Red Bicycle",
                                                                                          "a blue bicycle"}
    assert [r.caption for r in index.search("a photo", top_k=10, caption="RED B")] == ["A Red Bicycle"]
    assert index.search("a photo", top_k=10, caption="100%_") == []
    with pytest.raises(ValueError, match="caption filter is empty"):
        index.search("a photo", caption=" ")


def test_an_index_from_before_capture_dates_gains_them_without_encoding(tmp_path, one_thread):
    import sqlite3
    _dated_folder(tmp_path / "dated")
    index = _build(tmp_path / "index", [tmp_path / "dated"])
    before = {i: index.item(i) for i in index.ids()}
    index.close()
    with sqlite3.connect(tmp_path / "index" / "metadata.sqlite") as db:  # as an older clipforge wrote it
        db.execute("ALTER TABLE items DROP COLUMN captured")
        db.execute("ALTER TABLE items DROP COLUMN captured_from")
    old = Index.open(tmp_path / "index")
    assert old.item(1).captured is None and len(old.search("a photo", top_k=10)) == 6
    with pytest.raises(ValueError, match="predates capture dates: run `clipforge index` on it once"):
        old.search("a photo", after="2021-01-01")
    again = _build(tmp_path / "index", [tmp_path / "dated"])
    assert again.last_update["indexed"] == 0 and again.last_update["unchanged"] == 6
    for i, item in before.items():
        migrated = again.item(i)
        assert migrated.captured_from == item.captured_from
        # the EXIF offset was not kept by the older format: the wall-clock time is
        assert migrated.captured[:19] == item.captured[:19]


def _expected_tags(index, labels, threshold, top):
    """Each item's tags computed here: the classifier's multi-label scores of the stored vectors, top labels."""
    from clipforge.zeroshot import ZeroShotClassifier
    model, _ = load_model("tiny-vit", "cpu", random_init=True)
    ids = index.ids()
    scores = ZeroShotClassifier(model, labels).multilabel_scores(torch.from_numpy(index.vectors(ids))).numpy()
    expected = {}
    for id, row in zip(ids.tolist(), scores):
        best = [j for j in np.argsort(-row, kind="stable")[:top] if row[j] >= threshold]
        expected[id] = [labels[j] for j in best]
    return expected, scores


@pytest.mark.slow
def test_tags_are_the_classifiers_and_filter_searches(tmp_path, index_at, photos, one_thread):
    from clipforge.cli import main
    labels = ["a red thing", "a green thing", "a blue thing", "a yellow thing"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    index = _build(index_at, [photos])
    _, scores = _expected_tags(index, labels, 0.5, 2)
    threshold = float(np.median(scores))  # about half the scores pass, whatever the random weights give
    assert main(["tag", str(index_at), "--labels", str(tmp_path / "labels.txt"), "--threshold", str(threshold),
                 "--top", "2", "--json"]) == 0
    index = Index.open(index_at)
    expected, _ = _expected_tags(index, labels, threshold, 2)
    assert {i: [label for label, _ in index.tags(i)] for i in expected} == expected
    assert index.config["tags"]["threshold"] == threshold and index.config["tags"]["count"] == 4
    for label in labels:
        hits = index.search(f'a photo tag:{label.replace(" ", "_")}', top_k=50)
        assert {r.id for r in hits} == {i for i, tags in expected.items() if label in tags}
        assert all(label in r.tags for r in hits)
    both = index.search("a photo", top_k=50, tags=labels[:2])
    assert {r.id for r in both} == {i for i, tags in expected.items() if set(labels[:2]) <= set(tags)}
    # an update: a changed file loses its old tags and gets new ones, a new file is tagged, a deleted one goes
    changed = next(i for i, tags in expected.items() if tags)
    make_image(77).save(index.item(changed).path)
    write_folder(photos / "later", 1, start=60)
    os.remove(photos / "img005.jpg")
    updated = _build(index_at, [photos])
    again, _ = _expected_tags(updated, labels, threshold, 2)
    assert {i: [label for label, _ in updated.tags(i)] for i in again} == again
    assert not updated.search("a photo tag:nothing_like_this", top_k=5)
