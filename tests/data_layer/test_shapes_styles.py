"""Rendering styles of the built-in shapes, the built-in data spec parser and the hard world."""
import hashlib
import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import (STYLES, BuiltinSpec, ShapesConfig, ShapesDataset, class_names, open_sources,
                            parse_builtin_spec, world, write_classification, write_shapes)
from clipforge.data.sources import source_kind
from clipforge.train.validate import load_val_pairs

PALETTE = dict(ShapesConfig().colours)

# sha256 (first 16 hex digits) of 40 images and captions per setting, computed with shapes.py at commit
# 0ddbca7, before styles existed: the default style must keep rendering exactly those pixels.
BEFORE_STYLES = {("train", 0, 64): "10e09dbe08f6115c", ("heldout", 1, 32): "40f5b40759d3661e",
                 ("all", 7, 48): "359d6252709ff96a"}


def _digest(data: ShapesDataset, n: int = 40) -> str:
    h = hashlib.sha256()
    for i in range(n):
        h.update(np.asarray(data.image(i)).tobytes())
        h.update(data.caption(i).encode())
    return h.hexdigest()[:16]


def _pixels(data: ShapesDataset, i: int) -> np.ndarray:
    return np.asarray(data.image(i), dtype=np.float64)


@pytest.mark.parametrize("split, seed, size", sorted(BEFORE_STYLES))
def test_filled_renders_the_pixels_of_before_styles(split, seed, size):
    assert _digest(ShapesDataset(40, split, seed=seed, image_size=size)) == BEFORE_STYLES[split, seed, size]
    assert _digest(ShapesDataset(40, split, seed=seed, image_size=size, style="filled")) == \
        BEFORE_STYLES[split, seed, size]


@pytest.mark.parametrize("style", STYLES)
def test_every_style_is_deterministic_by_seed_and_index(style):
    short, long = ShapesDataset(6, seed=3, image_size=32, style=style), ShapesDataset(60, seed=3, image_size=32,
                                                                                      style=style)
    other_seed = ShapesDataset(6, seed=4, image_size=32, style=style)
    for i in range(6):
        assert np.array_equal(_pixels(short, i), _pixels(long, i))
        assert np.array_equal(short.mask(i), long.mask(i))
        assert short.attributes(i)["style"] == style
    assert not np.array_equal(_pixels(short, 0), _pixels(other_seed, 0))


def test_styles_differ_from_each_other_but_not_in_what_the_sample_shows():
    data = {style: ShapesDataset(8, "all", seed=2, image_size=32, style=style) for style in STYLES}
    for i in range(8):
        facts = {s: {k: v for k, v in d.attributes(i).items() if k != "style"} for s, d in data.items()}
        assert all(f == facts["filled"] for f in facts.values())
        assert len({d.caption(i) for d in data.values()}) == 1
        for a, b in itertools.combinations(STYLES, 2):  # the noise is identical: any change is the style's
            changed = np.abs(_pixels(data[a], i) - _pixels(data[b], i)).max(2) > 20
            shape_pixels = (data[a].mask(i) | data[b].mask(i)).sum()
            assert changed.sum() >= max(3, 0.2 * shape_pixels), (i, a, b, changed.sum(), shape_pixels)


@pytest.mark.parametrize("style", STYLES)
def test_the_colour_stays_recognisable_at_32px(style):
    """Mean colour of the inked pixels is nearest to the named colour among the palette, for every sample."""
    data = ShapesDataset(240, "all", seed=11, image_size=32, style=style)
    names, rgb = list(PALETTE), np.array(list(PALETTE.values()), dtype=np.float64)
    for i in range(len(data)):
        mask, colour = data.mask(i), data.attributes(i)["colour"]
        assert mask.sum() >= 3, (i, data.attributes(i))
        mean = _pixels(data, i)[mask].mean(0)
        assert names[int(np.argmin(((rgb - mean) ** 2).sum(1)))] == colour, (i, data.attributes(i), mean)


def _large(data: ShapesDataset, shape: str) -> list[int]:
    return [i for i in range(len(data)) if data.attributes(i)["shape"] == shape
            and data.attributes(i)["size"] == "large"]


def test_outline_and_sketch_draw_edges_textured_and_shaded_fill_with_two_tones_and_light():
    filled, outline, sketch, textured, shaded = (ShapesDataset(200, "all", seed=5, image_size=64, style=s)
                                                 for s in STYLES)
    squares = _large(filled, "square")
    assert len(squares) >= 3
    for i in squares:  # a large square covers most of its bounding box: outline inks a frame, not the inside
        assert outline.mask(i).sum() < 0.6 * filled.mask(i).sum()
        assert sketch.mask(i).sum() < 0.9 * filled.mask(i).sum()
        assert (outline.mask(i) & ~filled.mask(i)).any()  # strokes are centred on the edge
    for i in squares:
        inside = filled.mask(i) & textured.mask(i)
        grey = _pixels(textured, i)[inside].mean(1)
        assert np.percentile(grey, 90) - np.percentile(grey, 10) > 15  # stripes or checks: two tones
        flat = _pixels(filled, i)[inside].mean(1)
        assert np.percentile(flat, 90) - np.percentile(flat, 10) < 15
        lit = _pixels(shaded, i)[inside].mean(1)
        assert np.percentile(lit, 95) - np.percentile(lit, 5) > 25  # a highlight fading into shadow


def _grow(mask: np.ndarray, k: int) -> np.ndarray:
    grown = mask.copy()
    for dy, dx in itertools.product(range(-k, k + 1), repeat=2):
        grown |= np.roll(mask, (dy, dx), axis=(0, 1))
    return grown


def test_shaded_background_carries_grey_clutter():
    filled, shaded = (ShapesDataset(20, seed=6, image_size=64, style=s) for s in ("filled", "shaded"))
    for i in range(20):
        background = ~_grow(filled.mask(i) | shaded.mask(i), 3)
        level = _pixels(filled, i)[background].mean(0)
        plain = np.abs(_pixels(filled, i) - level).max(2)[background]
        cluttered = np.abs(_pixels(shaded, i) - level).max(2)[background]
        assert (plain > 40).mean() == 0 and (cluttered > 40).mean() > 0.01
        clutter = _pixels(shaded, i)[background][cluttered > 40]
        assert np.abs(clutter - clutter.mean(1, keepdims=True)).max() < 25  # neutral grey, no palette colour


def test_a_style_mix_draws_each_listed_style_and_renders_it_as_alone():
    mix = ShapesDataset(300, seed=0, image_size=32, style=("outline", "sketch", "shaded"))
    counts = Counter(mix.attributes(i)["style"] for i in range(len(mix)))
    assert set(counts) == {"outline", "sketch", "shaded"} and min(counts.values()) > 60
    alone = {s: ShapesDataset(300, seed=0, image_size=32, style=s) for s in counts}
    for i in range(12):
        assert np.array_equal(_pixels(mix, i), _pixels(alone[mix.attributes(i)["style"]], i))
    (source,) = open_sources("builtin:300:outline+sketch+shaded")
    assert [source.dataset.attributes(i)["style"] for i in range(300)] == \
        [mix.attributes(i)["style"] for i in range(300)]
    assert mix.styles == ShapesDataset(3, style="outline+sketch+shaded").styles


@pytest.mark.parametrize("spec, parsed", [
    ("builtin", BuiltinSpec(None, ("filled",), "default")),
    ("builtin:500", BuiltinSpec(500, ("filled",), "default")),
    ("builtin:outline", BuiltinSpec(None, ("outline",), "default")),
    ("builtin:20000:outline", BuiltinSpec(20000, ("outline",), "default")),
    ("builtin:5000:filled+sketch", BuiltinSpec(5000, ("filled", "sketch"), "default")),
    (" Builtin:7:Shaded ", BuiltinSpec(7, ("shaded",), "default")),
    ("builtin-hard", BuiltinSpec(None, ("filled",), "hard")),
    ("builtin-hard:64:textured+shaded", BuiltinSpec(64, ("textured", "shaded"), "hard")),
])
def test_parser_accepts_the_spec_forms(spec, parsed):
    assert parse_builtin_spec(spec) == parsed
    assert parse_builtin_spec(str(parsed)) == parsed
    assert source_kind(spec.strip()) == "builtin"


@pytest.mark.parametrize("spec, what", [
    ("builtin:many", "'many' is neither a number of samples nor a style"),
    ("builtin:10:glossy", "'glossy' is neither a number of samples nor a style"),
    ("builtin:10:filled+glossy", "unknown style 'glossy'"),
    ("builtin:filled+filled", "lists 'filled' more than once"),
    ("builtin:0", "at least 1"),
    ("builtin:", "empty field"),
    ("builtin:outline:10", "'outline' is not a number of samples"),
    ("builtin:1:outline:2", "at most a number and a style"),
    ("builtin-easy:10", "unknown built-in data 'builtin-easy'"),
])
def test_parser_refuses_with_what_was_wrong_and_the_valid_forms(spec, what):
    with pytest.raises(ValueError) as error:
        parse_builtin_spec(spec)
    message = str(error.value)
    assert what in message and repr(spec) in message
    assert "builtin:N:STYLE" in message and "builtin-hard" in message and ", ".join(STYLES) in message
    with pytest.raises(ValueError, match="valid forms"):
        open_sources(spec)


def test_dataset_and_spec_refuse_unknown_styles_and_worlds():
    with pytest.raises(ValueError, match="unknown style 'glossy'.*filled, outline, sketch, textured, shaded"):
        ShapesDataset(3, style="glossy")
    with pytest.raises(ValueError, match="unknown built-in world 'easy'"):
        world("easy")
    with pytest.raises(ValueError, match="at least one sample"):
        BuiltinSpec(0)


def test_a_path_that_starts_with_builtin_stays_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builtin-photos").mkdir()
    ShapesDataset(1).image(0).save(tmp_path / "builtin-photos" / "a.png")
    (tmp_path / "builtin-photos" / "a.txt").write_text("a red circle")
    assert source_kind("builtin-photos") == "folder"
    assert source_kind("builtin-hard:3") == "builtin"


def test_the_hard_world_holds_out_a_third_and_keeps_every_colour_and_shape_in_training():
    hard, default = world("hard"), world("default")
    assert default == ShapesConfig()
    pairs = len(hard.colour_names) * len(hard.shapes)
    assert len(hard.heldout) == 16 and abs(len(hard.heldout) / pairs - 1 / 3) < 0.01
    assert set(default.heldout) < set(hard.heldout)
    train = ShapesDataset(4000, "train", config=hard)
    seen = {(a["colour"], a["shape"]) for a in map(train.attributes, range(len(train)))}
    assert seen == set(hard.pairs("train")) and not seen & set(hard.heldout)
    assert {c for c, _ in seen} == set(hard.colour_names) and {s for _, s in seen} == set(hard.shapes)
    assert len(class_names("heldout", config=hard)) == 16 and len(class_names("train", config=hard)) == 32
    (source,) = open_sources("builtin-hard:50:sketch")
    assert source.dataset.config == hard and source.dataset.styles == ("sketch",)
    assert source.dataset.class_names() == class_names("train", config=hard)


def test_writers_take_the_style(tmp_path):
    spec = write_shapes(tmp_path / "pairs", 3, fmt="folder", style="sketch", image_size=32)
    labelled = write_classification(tmp_path / "cls", "heldout", 3, style="textured", image_size=32)
    sketch = ShapesDataset(3, "train", seed=0, image_size=32, style="sketch")
    textured = ShapesDataset(3, "heldout", seed=1, image_size=32, style="textured")
    for i in range(3):
        written = np.asarray(Image.open(f"{spec}/{i:09d}.png").convert("RGB"), dtype=np.float64)
        assert np.array_equal(written, _pixels(sketch, i))
        folder = textured.class_name(i).replace(" ", "_")
        written = np.asarray(Image.open(f"{labelled}/{folder}/{i:09d}.png").convert("RGB"), dtype=np.float64)
        assert np.array_equal(written, _pixels(textured, i))


def test_validation_pairs_read_the_same_spec():
    val = load_val_pairs("builtin:4:outline", lambda im: torch.from_numpy(np.asarray(im).copy()),
                         lambda captions: captions)
    expected = ShapesDataset(4, "train", seed=1, style="outline")
    assert val.captions == [expected.caption(i) for i in range(4)]
    assert np.array_equal(val.images[2].numpy(), np.asarray(expected.image(2)))
    with pytest.raises(ValueError, match="--val-data 'builtin:4:glossy'.*valid forms"):
        load_val_pairs("builtin:4:glossy", lambda im: im, lambda c: c)
