"""The built-in shapes dataset: determinism, held-out pairs, accurate captions, rendering and writers."""
import csv
import tarfile
from collections import Counter

import numpy as np
import pytest

from clipforge.data import (ShapesConfig, ShapesDataset, class_names, heldout_pairs, iter_pairs, templates,
                            write_classification, write_shapes)

CFG = ShapesConfig()
COLOURS = CFG.colour_names
SIZES = [name for name, _ in CFG.sizes]
PHRASES = {name: phrases for name, _, phrases in CFG.positions}


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (ShapesDataset(20, seed=s, image_size=32) for s in (3, 3, 4))
    for i in range(20):
        assert a.caption(i) == b.caption(i)
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))
    assert [a.caption(i) for i in range(20)] != [c.caption(i) for i in range(20)]


def test_samples_do_not_depend_on_dataset_length_or_image_size():
    short, long, large = ShapesDataset(10), ShapesDataset(1000), ShapesDataset(10, image_size=96)
    assert [short[i][1] for i in range(10)] == [long[i][1] for i in range(10)]
    assert [short.attributes(i) for i in range(10)] == [large.attributes(i) for i in range(10)]
    assert np.array_equal(np.asarray(short.image(7)), np.asarray(long.image(7)))


def test_heldout_pairs_never_in_train_and_only_in_heldout():
    held = set(heldout_pairs())
    assert 0.15 <= len(held) / (len(COLOURS) * len(CFG.shapes)) <= 0.2
    train, heldout = ShapesDataset(5000, "train"), ShapesDataset(400, "heldout")
    train_pairs = {(a["colour"], a["shape"]) for a in map(train.attributes, range(len(train)))}
    heldout_seen = {(a["colour"], a["shape"]) for a in map(heldout.attributes, range(len(heldout)))}
    assert not train_pairs & held
    assert heldout_seen == held
    assert train_pairs == set(CFG.pairs("train"))  # every allowed training pair occurs
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(CFG.shapes)


def test_captions_name_the_right_attributes():
    data = ShapesDataset(600)
    said_size = said_position = 0
    for i in range(len(data)):
        caption, a = data.caption(i), data.attributes(i)
        words = caption.split()
        assert a["colour"] in words and a["shape"] in words
        assert [w for w in words if w in COLOURS] == [a["colour"]]
        assert [w for w in words if w in SIZES] in ([], [a["size"]])
        said_size += a["size"] in words
        found = [(len(p), pos) for pos, phrases in PHRASES.items() for p in phrases if p in caption]
        if found:
            assert max(found)[1] == a["position"], caption
            said_position += 1
    assert 0.3 < said_size / len(data) < 0.9 and 0.5 < said_position / len(data) < 0.95
    assert len({data.caption(i) for i in range(len(data))}) > 300  # varied phrasing


def test_images_show_the_captioned_shape_at_its_position():
    data = ShapesDataset(300, image_size=64)
    colours, centres = dict(CFG.colours), {name: xy for name, xy, _ in CFG.positions}
    checked = 0
    for i in range(len(data)):
        a = data.attributes(i)
        if a["shape"] == "ring" or a["size"] == "small":
            continue  # a ring's centre is background; small shapes may miss the unjittered centre
        image = np.asarray(data.image(i), dtype=np.float32)
        x, y = (round(f * 64) for f in centres[a["position"]])
        assert np.abs(image[y, x] - colours[a["colour"]]).max() < 40, (i, a)
        checked += 1
    assert checked > 100


def test_metadata_for_50k_and_rendering_1000_at_32px():
    data = ShapesDataset(50_000, image_size=32)
    assert len(data) == 50_000 and data.attributes(49_999)["shape"] in CFG.shapes
    images = [data.image(i) for i in range(1000)]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    assert len({im.tobytes() for im in images}) == 1000


def test_class_names_and_labels():
    assert class_names("heldout") == sorted(f"{c} {s}" for c, s in heldout_pairs())
    assert class_names("all", by="shape") == sorted(CFG.shapes)
    assert class_names("train", by="colour") == sorted(f"{c} shape" for c in COLOURS)
    data = ShapesDataset(50, "heldout")
    for by in ("pair", "colour", "shape"):
        names = data.class_names(by)
        assert all(names[data.label(i, by)] == data.class_name(i, by) for i in range(50))
    a = data.attributes(0)
    assert data.class_name(0) == f"{a['colour']} {a['shape']}"
    with pytest.raises(ValueError, match="labelling"):
        class_names("train", by="size")
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(5, split="test")
    assert all("{}" in t for t in templates())


def test_config_rejects_bad_heldout_pairs():
    with pytest.raises(ValueError, match="not among"):
        ShapesConfig(heldout=(("teal", "circle"),))
    with pytest.raises(ValueError, match="every partner"):
        ShapesConfig(heldout=tuple(("red", s) for s in CFG.shapes))


@pytest.mark.parametrize("fmt", ["csv", "folder", "wds"])
def test_write_shapes_round_trips(tmp_path, fmt):
    spec = write_shapes(tmp_path / fmt, 12, fmt=fmt, image_size=32, samples_per_shard=5)
    data = ShapesDataset(12, image_size=32)
    pairs = list(iter_pairs(spec))
    assert [caption for _, caption in pairs] == [data.caption(i) for i in range(12)]
    assert np.array_equal(np.asarray(pairs[3][0]), np.asarray(data.image(3)))  # PNG is lossless
    if fmt == "wds":
        assert spec.endswith("{00000..00002}.tar")


def test_write_classification_formats(tmp_path):
    data = ShapesDataset(30, "heldout", seed=1, image_size=32)
    names = data.class_names()
    root = write_classification(tmp_path / "folder", "heldout", 30, image_size=32)
    assert (tmp_path / "folder" / "classnames.txt").read_text().split("\n")[:-1] == names
    folders = sorted(p.name for p in (tmp_path / "folder").iterdir() if p.is_dir())
    assert [f.replace("_", " ") for f in folders] == sorted({data.class_name(i) for i in range(30)})
    assert sum(len(list((tmp_path / "folder" / f).glob("*.png"))) for f in folders) == 30 and root

    spec = write_classification(tmp_path / "wds", "heldout", 30, fmt="wds", image_size=32, samples_per_shard=16)
    labels = []
    for shard in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(shard) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
    assert labels == [data.label(i) for i in range(30)] and spec.endswith("{00000..00001}.tar")

    with open(write_classification(tmp_path / "csv", "heldout", 30, fmt="csv", image_size=32), newline="") as f:
        rows = list(csv.DictReader(f))
    assert Counter(int(r["label"]) for r in rows) == Counter(data.label(i) for i in range(30))
    assert all(names[int(r["label"])] == r["classname"] for r in rows)
