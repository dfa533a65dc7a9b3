"""The built-in dataset: generated scenes of one coloured shape with a natural-language caption.

Some colour-shape pairs never appear in the training split, so zero-shot classification on them
(class names such as "red triangle") measures transfer to combinations never seen with an image, in
the spirit of CLIP's zero-shot evaluation (Radford et al. 2021, section 3.1). Rendering styles (filled,
outline, sketch, textured, shaded) give the distribution shifts of its robustness study (section 3.3).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SPLITS = {"train": 0, "heldout": 1, "all": 2}
LABELLINGS = ("pair", "colour", "shape")
STYLES = ("filled", "outline", "sketch", "textured", "shaded")
WORLDS = ("default", "hard")

_COLOURS = (("red", (215, 40, 40)), ("orange", (245, 135, 20)), ("yellow", (235, 205, 25)),
            ("green", (40, 165, 60)), ("blue", (40, 80, 215)), ("purple", (135, 55, 185)),
            ("pink", (240, 120, 190)), ("black", (25, 25, 25)))
_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
_SIZES = (("small", 0.11), ("medium", 0.17), ("large", 0.23))
# name, centre as fractions of the image (x, y), phrases that place a shape there
_POSITIONS = (
    ("top left", (0.27, 0.27), ("in the top left", "in the upper left corner", "at the top left")),
    ("top", (0.5, 0.27), ("at the top", "near the top", "in the top middle")),
    ("top right", (0.73, 0.27), ("in the top right", "in the upper right corner", "at the top right")),
    ("left", (0.27, 0.5), ("on the left", "on the left side", "at the left")),
    ("center", (0.5, 0.5), ("in the center", "in the middle", "in the centre")),
    ("right", (0.73, 0.5), ("on the right", "on the right side", "at the right")),
    ("bottom left", (0.27, 0.73), ("in the bottom left", "in the lower left corner", "at the bottom left")),
    ("bottom", (0.5, 0.73), ("at the bottom", "near the bottom", "in the bottom middle")),
    ("bottom right", (0.73, 0.73), ("in the bottom right", "in the lower right corner", "at the bottom right")),
)
# One pair per colour; every colour and every shape keeps training partners (8 of 48 pairs, 17%).
_HELDOUT = (("red", "triangle"), ("orange", "square"), ("yellow", "circle"), ("green", "ring"),
            ("blue", "cross"), ("purple", "star"), ("pink", "triangle"), ("black", "square"))
# The hard world holds out a second pair per colour (16 of 48, a third); each shape loses 2 or 3 colours.
_HARD_HELDOUT = _HELDOUT + (("red", "star"), ("orange", "circle"), ("yellow", "cross"), ("green", "circle"),
                            ("blue", "ring"), ("purple", "square"), ("pink", "star"), ("black", "triangle"))

# {thing}: article + optional size + colour + shape ("a small red circle"); {where}: a position phrase
_CAPTIONS_PLACED = ("{thing} {where}", "there is {thing} {where}", "a photo of {thing} {where}",
                    "a picture of {thing} {where}", "{where} there is {thing}", "an image with {thing} {where}",
                    "a simple drawing of {thing} {where}", "the {bare} is {where}")
_CAPTIONS_PLAIN = ("{thing}", "a photo of {thing}", "there is {thing}", "a drawing of {thing}",
                   "an image of {thing} on a plain background", "a photo of the {bare}")
_TEMPLATES = ("a photo of the {}.", "the {}.", "a picture of the {}.", "an image showing the {}.",
              "a drawing of the {}.", "the {} on a plain background.")


@dataclass(frozen=True)
class ShapesConfig:
    """What the generated world contains: attribute vocabularies, held-out pairs and rendering noise.

    ``colours`` are (name, RGB) pairs, ``sizes`` (name, radius as a fraction of the image side),
    ``positions`` (name, (x, y) centre fractions, caption phrases). ``heldout`` colour-shape pairs
    never occur in the "train" split and are the only pairs of the "heldout" split.
    """
    colours: tuple = _COLOURS
    shapes: tuple = _SHAPES
    sizes: tuple = _SIZES
    positions: tuple = _POSITIONS
    heldout: tuple = _HELDOUT
    noise_std: float = 4.0      # per-pixel Gaussian noise, in 0-255 units
    jitter: float = 0.04        # centre jitter, as a fraction of the image side
    size_caption_rate: float = 0.6      # fraction of captions that name the size
    position_caption_rate: float = 0.75  # fraction of captions that name the position

    def __post_init__(self):
        colours, shapes = self.colour_names, self.shapes
        for colour, shape in self.heldout:
            if colour not in colours or shape not in shapes:
                raise ValueError(f"held-out pair ({colour!r}, {shape!r}) is not among colours {colours} "
                                 f"and shapes {shapes}")
        for name, partners in [(c, [(c, s) for s in shapes]) for c in colours] + \
                               [(s, [(c, s) for c in colours]) for s in shapes]:
            if all(p in self.heldout for p in partners):
                raise ValueError(f"{name!r} is held out with every partner, so training never shows it; "
                                 "hold out fewer pairs")

    @property
    def colour_names(self) -> tuple:
        return tuple(name for name, _ in self.colours)

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """The colour-shape pairs a split draws from, in (colour, shape) definition order."""
        _check_split(split)
        every = [(c, s) for c in self.colour_names for s in self.shapes]
        if split == "all":
            return every
        return [p for p in every if (p in self.heldout) == (split == "heldout")]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")


def heldout_pairs(config: ShapesConfig | None = None) -> list[tuple[str, str]]:
    """The (colour, shape) pairs that never appear in the training split."""
    return list((config or ShapesConfig()).heldout)


def class_names(split: str = "heldout", by: str = "pair", config: ShapesConfig | None = None) -> list[str]:
    """Sorted zero-shot class names of a split: "red circle" (by="pair"), "red shape" or "circle".

    Sorted, so the order equals an image-folder layout's (class index = sorted directory names).
    """
    config = config or ShapesConfig()
    pairs = config.pairs(split)
    if by == "pair":
        return sorted(f"{c} {s}" for c, s in pairs)
    if by == "colour":
        return sorted({f"{c} shape" for c, _ in pairs})
    if by == "shape":
        return sorted({s for _, s in pairs})
    _check_labelling(by)


def _check_labelling(by: str) -> None:
    if by not in LABELLINGS:
        raise ValueError(f"unknown labelling {by!r}; expected one of {LABELLINGS}")


def templates() -> list[str]:
    """Zero-shot prompt templates for the shapes domain; ``{}`` takes a class name."""
    return list(_TEMPLATES)


def world(name: str = "default") -> ShapesConfig:
    """A named built-in world: "default" (8 of 48 colour-shape pairs held out) or "hard" (16 held out,
    two per colour; every colour and every shape still appears in training)."""
    if name not in WORLDS:
        raise ValueError(f"unknown built-in world {name!r}; expected one of {WORLDS}")
    return ShapesConfig() if name == "default" else ShapesConfig(heldout=_HARD_HELDOUT)


def check_styles(style: str | tuple | list) -> tuple[str, ...]:
    """A style argument as a tuple of style names: one name, names joined by "+", or a sequence of names."""
    names = style.split("+") if isinstance(style, str) else list(style)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"style must be one of {STYLES}, several joined by '+', or a tuple of them; got {style!r}")
    names = [n.strip().lower() for n in names]
    unknown = [n for n in names if n not in STYLES]
    if unknown:
        raise ValueError(f"unknown style{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"expected one of {', '.join(STYLES)} (several joined by '+')")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"style {style!r} lists {', '.join(map(repr, twice))} more than once")
    return tuple(names)


_SPEC_WORLDS = {"builtin": "default", "builtin-hard": "hard"}
_SPEC_FORMS = ("valid forms: builtin, builtin:N, builtin:STYLE, builtin:N:STYLE, with N a number of samples and "
               f"STYLE one of {', '.join(STYLES)} or several joined by '+' (builtin:5000:filled+sketch); "
               "builtin-hard takes the same forms for the hard world (a third of the colour-shape pairs held out)")


@dataclass(frozen=True)
class BuiltinSpec:
    """A parsed built-in data spec: ``num_samples`` (None: the caller's default), the rendering ``styles``
    (several: each sample's style drawn among them) and the ``world`` ("default" or "hard")."""
    num_samples: int | None = None
    styles: tuple = ("filled",)
    world: str = "default"

    def __post_init__(self):
        object.__setattr__(self, "styles", check_styles(self.styles))
        world(self.world)
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"a built-in data spec needs at least one sample, got {self.num_samples}")

    @property
    def config(self) -> ShapesConfig:
        return world(self.world)

    def dataset(self, default_samples: int, split: str = "train", seed: int = 0,
                image_size: int = 64) -> "ShapesDataset":
        """The spec's data of ``split``: ``num_samples`` samples, or ``default_samples`` when it names none."""
        n = default_samples if self.num_samples is None else self.num_samples
        return ShapesDataset(n, split, seed, image_size, config=self.config, style=self.styles)

    def __str__(self) -> str:
        name = next(k for k, v in _SPEC_WORLDS.items() if v == self.world)
        fields = [name] + ([str(self.num_samples)] if self.num_samples is not None else [])
        return ":".join(fields + (["+".join(self.styles)] if self.styles != ("filled",) else []))


def is_builtin_spec(part: str) -> bool:
    """Whether a data spec part names the built-in data (``builtin...``) rather than a file or folder."""
    part = part.strip()
    name = part.partition(":")[0].lower()
    return name == "builtin" or (name.startswith("builtin-") and not os.path.exists(part))


def parse_builtin_spec(spec: str) -> BuiltinSpec:
    """Parse ``builtin[:N][:STYLE[+STYLE...]]`` or ``builtin-hard[...]``; a ValueError names what is
    wrong and the valid forms."""
    name, *fields = spec.strip().lower().split(":")
    if name not in _SPEC_WORLDS:
        raise ValueError(f"{spec!r}: unknown built-in data {name!r}; {_SPEC_FORMS}")
    if "" in fields:
        raise ValueError(f"{spec!r}: empty field after ':'; {_SPEC_FORMS}")
    if len(fields) > 2:
        raise ValueError(f"{spec!r}: expected at most a number and a style after {name!r}; {_SPEC_FORMS}")
    count = fields.pop(0) if fields and fields[0].isascii() and fields[0].isdigit() else None
    if len(fields) > 1:
        raise ValueError(f"{spec!r}: {fields[0]!r} is not a number of samples; {_SPEC_FORMS}")
    if count is not None and int(count) < 1:
        raise ValueError(f"{spec!r}: the number of samples must be at least 1; {_SPEC_FORMS}")
    field = fields[0] if fields else "filled"
    unknown = [n for n in field.split("+") if n not in STYLES]
    if unknown:
        what = f"{field!r} is neither a number of samples nor a style" if "+" not in field else \
            f"unknown style {', '.join(map(repr, unknown))} in {field!r}"
        raise ValueError(f"{spec!r}: {what}; {_SPEC_FORMS}")
    try:
        styles = check_styles(field)
    except ValueError as e:
        raise ValueError(f"{spec!r}: {e}; {_SPEC_FORMS}") from None
    return BuiltinSpec(int(count) if count else None, styles, _SPEC_WORLDS[name])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class ShapesDataset:
    """``num_samples`` generated (image, caption) pairs of one split, deterministic from ``seed``.

    Metadata for all samples is drawn at construction (vectorised, instant); images are rendered on
    access from (seed, split, index), so sample ``i`` is the same in any dataset length. Indexing
    returns ``(PIL.Image RGB of image_size x image_size, caption)``. ``style`` is one of ``STYLES``
    or several (a tuple, or names joined by "+"): then each sample's style is drawn among them. A sample's
    attributes, caption and geometry do not depend on its style.
    """

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0, image_size: int = 64,
                 config: ShapesConfig | None = None, style: str | tuple = "filled"):
        _check_split(split)
        if num_samples < 0 or image_size < 8:
            raise ValueError(f"need num_samples >= 0 and image_size >= 8, got {num_samples}, {image_size}")
        self.num_samples, self.split, self.seed, self.image_size = num_samples, split, seed, image_size
        self.config = config or ShapesConfig()
        self.styles = check_styles(style)
        self._pairs = self.config.pairs(split)
        self._codes = self._draw_codes()

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], *stream])

    def _draw_codes(self) -> dict[str, np.ndarray]:
        """Per-sample attribute and phrasing codes; each from its own stream so prefixes are stable."""
        cfg, n = self.config, self.num_samples
        counts = {"pair": len(self._pairs), "size": len(cfg.sizes), "position": len(cfg.positions),
                  "phrase": 3, "template": len(_CAPTIONS_PLACED) * len(_CAPTIONS_PLAIN)}
        codes = {name: self._rng(1 << 20, k).integers(0, count, n) for k, (name, count) in enumerate(counts.items())}
        codes["say_size"] = self._rng(1 << 20, 10).random(n) < cfg.size_caption_rate
        codes["say_position"] = self._rng(1 << 20, 11).random(n) < cfg.position_caption_rate
        codes["style"] = self._rng(1 << 20, 12).integers(0, len(self.styles), n)
        return codes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        return self.image(i), self.caption(i)

    def _index(self, i: int) -> int:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a ShapesDataset of {self.num_samples}")
        return i % self.num_samples

    def attributes(self, i: int) -> dict[str, str]:
        """The ground truth of sample ``i``: dict(colour, shape, size, position, style)."""
        i = self._index(i)
        colour, shape = self._pairs[self._codes["pair"][i]]
        size = self.config.sizes[self._codes["size"][i]][0]
        position = self.config.positions[self._codes["position"][i]][0]
        style = self.styles[self._codes["style"][i]]
        return {"colour": colour, "shape": shape, "size": size, "position": position, "style": style}

    def caption(self, i: int) -> str:
        """The caption of sample ``i``; always names colour and shape, often size and position."""
        i = self._index(i)
        a, codes = self.attributes(i), self._codes
        bare = f"{a['size']} {a['colour']} {a['shape']}" if codes["say_size"][i] else f"{a['colour']} {a['shape']}"
        thing = f"{_article(bare)} {bare}"
        template = int(codes["template"][i])
        if codes["say_position"][i]:
            phrases = self.config.positions[codes["position"][i]][2]
            where = phrases[codes["phrase"][i] % len(phrases)]
            return _CAPTIONS_PLACED[template % len(_CAPTIONS_PLACED)].format(thing=thing, where=where, bare=bare)
        return _CAPTIONS_PLAIN[template % len(_CAPTIONS_PLAIN)].format(thing=thing, bare=bare)

    def class_names(self, by: str = "pair") -> list[str]:
        """Sorted class names of this split (see the module-level ``class_names``)."""
        return class_names(self.split, by, self.config)

    @cached_property
    def _class_index(self) -> dict[str, dict[str, int]]:
        return {by: {name: k for k, name in enumerate(self.class_names(by))} for by in LABELLINGS}

    def class_name(self, i: int, by: str = "pair") -> str:
        """The class name of sample ``i`` under a labelling ("pair", "colour" or "shape")."""
        _check_labelling(by)
        a = self.attributes(i)
        return {"pair": f"{a['colour']} {a['shape']}", "colour": f"{a['colour']} shape", "shape": a["shape"]}[by]

    def label(self, i: int, by: str = "pair") -> int:
        """The index of sample ``i``'s class in ``class_names`` for the same labelling."""
        return self._class_index[by][self.class_name(i, by)]

    def image(self, i: int) -> Image.Image:
        """Render sample ``i``: light tinted noisy background, one jittered, slightly rotated shape in its style."""
        return self._render(i)[0]

    def mask(self, i: int) -> np.ndarray:
        """Where sample ``i``'s shape is inked: (image_size, image_size) bool, pixels at least 3/4 covered."""
        _, ink, scene = self._render(i)
        ink = (ink if ink is not None else _solid_ink(scene)).resize((self.image_size,) * 2, Image.Resampling.BOX)
        return np.asarray(ink) >= 192

    def _render(self, i: int) -> tuple[Image.Image, Image.Image | None, "_Scene"]:
        """The noisy image of sample ``i``, its ink (L, at twice the image size; None: the solid shape's)
        and its scene."""
        i = self._index(i)
        a, rng = self.attributes(i), self._rng(i)
        scene = self._scene(a, rng)
        style_rng = self._rng(i, _STYLE_STREAM) if a["style"] != "filled" else None  # filled draws nothing more
        canvas, ink = _PAINTERS[a["style"]](scene, style_rng)
        canvas = canvas.resize((self.image_size, self.image_size), Image.Resampling.BOX)
        noise = rng.normal(0.0, self.config.noise_std, (self.image_size,) * 2 + (3,))
        noisy = np.asarray(canvas, dtype=np.float32) + noise
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB"), ink, scene

    def _scene(self, a: dict, rng: np.random.Generator) -> "_Scene":
        """Sample geometry and colours, drawn from the sample's own stream (the noise follows on it)."""
        cfg = self.config
        side = 2 * self.image_size  # drawn at twice the size, then box-filtered: smooth edges
        background = tuple(int(v) for v in rng.integers(212, 250, 3))
        colour = np.asarray(dict(cfg.colours)[a["colour"]]) + rng.integers(-12, 13, 3)
        fill = tuple(int(v) for v in np.clip(colour, 0, 255))
        (fx, fy) = dict((p[0], p[1]) for p in cfg.positions)[a["position"]]
        cx, cy = (np.array([fx, fy]) + rng.uniform(-cfg.jitter, cfg.jitter, 2)) * side
        radius = dict(cfg.sizes)[a["size"]] * side * rng.uniform(0.9, 1.1)
        angle = rng.uniform(-15.0, 15.0)
        return _Scene(a["shape"], float(cx), float(cy), float(radius), angle, side, background, fill)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at equal angular steps with the given radii, the first one pointing up, rotated by angle."""
    start = math.radians(angle) - math.pi / 2
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(start + k * step), cy + r * math.sin(start + k * step)) for k, r in enumerate(radii)]


def _plus(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """A plus sign of arm half-width r/3 as a 12-vertex polygon, rotated by angle (degrees)."""
    w = r / 3
    outline = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The outline of a polygonal shape (square, triangle, star, cross)."""
    if shape == "square":
        return _polygon(cx, cy, [r * 1.05] * 4, angle + 45)
    if shape == "triangle":
        return _polygon(cx, cy + r * 0.15, [r * 1.15] * 3, angle)
    if shape == "star":
        return _polygon(cx, cy, [r * 1.15, r * 0.5] * 5, angle)
    if shape == "cross":
        return _plus(cx, cy, r, angle)
    raise ValueError(f"cannot draw shape {shape!r}; known shapes: {_SHAPES}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple[int, int, int] | int, min_ring_width: int = 2) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(min_ring_width, round(r * 0.35)))
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r, angle), fill=fill)


@dataclass(frozen=True)
class _Scene:
    """One sample's shape and colours at the drawing resolution (``side`` pixels square)."""
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    side: int
    background: tuple
    fill: tuple


_STYLE_STREAM = 1 << 21  # a sample's style-specific randomness: a stream apart from its geometry and noise


def _outline_paths(scene: _Scene) -> list[list[tuple[float, float]]]:
    """The closed lines that draw the shape's edges; a ring has two, so it stays apart from a circle."""
    s = scene
    if s.shape == "circle":
        return [_polygon(s.cx, s.cy, [s.radius] * 48, 0.0)]
    if s.shape == "ring":
        return [_polygon(s.cx, s.cy, [s.radius] * 48, 0.0), _polygon(s.cx, s.cy, [s.radius * 0.5] * 32, 0.0)]
    return [_shape_polygon(s.shape, s.cx, s.cy, s.radius, s.angle)]


def _blank(scene: _Scene, mode: str = "L", colour=0) -> Image.Image:
    return Image.new(mode, (scene.side, scene.side), colour)


def _solid_ink(scene: _Scene, min_ring_width: int = 2) -> Image.Image:
    ink = _blank(scene)
    _draw_shape(ImageDraw.Draw(ink), scene.shape, scene.cx, scene.cy, scene.radius, scene.angle, 255, min_ring_width)
    return ink


_TINT = 0.25  # how far a texture's light tone goes from the colour toward white
# A texture or a lighting gradient needs room: painted rings are at least two output pixels wide.
_PAINTED_RING_WIDTH = 4


def _ink_on(scene: _Scene, ink: Image.Image, paint, base: Image.Image | None = None) -> Image.Image:
    """``paint`` (an RGB colour, or an (h, w, 3) array covering ``_shape_grid``'s box) through ``ink``
    over ``base`` (default: the background)."""
    base = base if base is not None else _blank(scene, "RGB", scene.background)
    layer = _blank(scene, "RGB", scene.fill if isinstance(paint, np.ndarray) else paint)
    if isinstance(paint, np.ndarray):
        layer.paste(Image.fromarray(np.clip(paint, 0, 255).astype(np.uint8), "RGB"), _shape_box(scene)[:2])
    return Image.composite(layer, base, ink)


def _shape_box(scene: _Scene) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a box that holds every shape's ink, within the canvas."""
    reach = 1.3 * scene.radius + 2
    x0, y0 = (max(0, math.floor(c - reach)) for c in (scene.cx, scene.cy))
    x1, y1 = (min(scene.side, math.ceil(c + reach)) for c in (scene.cx, scene.cy))
    return x0, y0, x1, y1


def _shape_grid(scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates of the pixel centres in ``_shape_box``, relative to the shape's centre."""
    x0, y0, x1, y1 = _shape_box(scene)
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return y - scene.cy, x - scene.cx


def _paint_filled(scene: _Scene, rng: np.random.Generator) -> tuple[Image.Image, None]:
    canvas = _blank(scene, "RGB", scene.background)
    _draw_shape(ImageDraw.Draw(canvas), scene.shape, scene.cx, scene.cy, scene.radius, scene.angle, scene.fill)
    return canvas, None


def _paint_outline(scene: _Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The shape's edges as even strokes in its colour."""
    ink = _blank(scene)
    draw = ImageDraw.Draw(ink)
    for path in _outline_paths(scene):
        draw.line(path + path[:2], fill=255, width=max(4, round(0.2 * scene.radius)), joint="curve")
    return _ink_on(scene, ink, scene.fill), ink


def _paint_sketch(scene: _Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Two wobbly passes over the edges and loose hatching inside, like a quick pen sketch."""
    r, ink = scene.radius, _blank(scene)
    draw = ImageDraw.Draw(ink)
    for path in _outline_paths(scene):
        for _ in range(2):
            draw.line(_wobbly(path + path[:1], rng, 0.06 * r, max(3.0, r / 4)), fill=255,
                      width=max(3, round(0.14 * r)), joint="curve")
    ink = ImageChops.lighter(ink, ImageChops.multiply(_hatching(scene, rng), _solid_ink(scene)))
    return _ink_on(scene, ink, scene.fill), ink


def _hatching(scene: _Scene, rng: np.random.Generator) -> Image.Image:
    """Parallel, slightly wobbly strokes at a random angle across the shape's box (L image)."""
    r, hatch = scene.radius, _blank(scene)
    draw = ImageDraw.Draw(hatch)
    theta = rng.uniform(0.0, math.pi)
    (dx, dy), reach = (math.cos(theta), math.sin(theta)), 1.3 * r
    for k in np.arange(-reach, reach, max(6.0, 0.4 * r)):
        ox, oy = scene.cx - k * dy, scene.cy + k * dx
        line = [(ox - reach * dx, oy - reach * dy), (ox + reach * dx, oy + reach * dy)]
        draw.line(_wobbly(line, rng, 0.04 * r, max(3.0, r / 3)), fill=255, width=max(2, round(0.09 * r)))
    return hatch


def _wobbly(points: list, rng: np.random.Generator, amount: float, step: float) -> list[tuple[float, float]]:
    """``points`` with each segment split into pieces of about ``step``, shifted and jittered by ``amount``."""
    dense = []
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        pieces = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / step))
        dense += [(x0 + (x1 - x0) * t / pieces, y0 + (y1 - y0) * t / pieces) for t in range(pieces)]
    dense.append(points[-1])
    moved = np.asarray(dense) + rng.normal(0.0, amount, 2) + rng.normal(0.0, amount, (len(dense), 2))
    return [tuple(p) for p in moved.tolist()]


def _paint_textured(scene: _Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The shape filled with stripes or checks of its colour and a lighter tint of it."""
    y, x = _shape_grid(scene)
    theta, half = rng.uniform(0.0, math.pi), max(4.0, 0.3 * scene.radius)
    u = (x * math.cos(theta) + y * math.sin(theta)) / half
    v = (y * math.cos(theta) - x * math.sin(theta)) / half
    on = np.floor(u) % 2 == 0 if rng.random() < 0.5 else (np.floor(u) + np.floor(v)) % 2 == 0
    colour = np.asarray(scene.fill, dtype=np.float32)
    paint = np.where(on[..., None], colour, colour + (255 - colour) * _TINT)
    ink = _solid_ink(scene, _PAINTED_RING_WIDTH)
    return _ink_on(scene, ink, paint), ink


def _paint_shaded(scene: _Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The shape lit from one side (a highlight fading into shadow) over grey background clutter."""
    base = _blank(scene, "RGB", scene.background)
    _draw_clutter(ImageDraw.Draw(base), scene.side, rng)
    light, r = rng.uniform(0.0, 2 * math.pi), scene.radius
    y, x = _shape_grid(scene)
    t = np.clip(np.hypot(x - 0.5 * r * math.cos(light), y - 0.5 * r * math.sin(light)) / (1.6 * r),
                0.0, 1.0)[..., None]  # 0 at the highlight, about 1 at the far edge
    colour = np.asarray(scene.fill, dtype=np.float32)
    lit = colour + (255 - colour) * 0.35 * np.clip(1 - 2 * t, 0.0, 1.0)
    ink = _solid_ink(scene, _PAINTED_RING_WIDTH)
    return _ink_on(scene, ink, lit * (1 - 0.3 * np.clip(2 * t - 1, 0.0, 1.0)), base), ink


def _draw_clutter(draw: ImageDraw.ImageDraw, side: int, rng: np.random.Generator) -> None:
    """Short grey strokes and dots scattered over the background (the shape is painted over them)."""
    for _ in range(int(rng.integers(3, 7))):
        points = [rng.uniform(0.05, 0.95, 2) * side]
        for _ in range(int(rng.integers(1, 3))):
            heading, length = rng.uniform(0.0, 2 * math.pi), rng.uniform(0.1, 0.3) * side
            points.append(points[-1] + length * np.array([math.cos(heading), math.sin(heading)]))
        draw.line([tuple(p) for p in np.asarray(points).tolist()], fill=_grey(rng), width=max(2, round(side / 80)),
                  joint="curve")
    for _ in range(int(rng.integers(6, 14))):
        (x, y), radius = rng.uniform(0.05, 0.95, 2) * side, max(2.0, side * rng.uniform(0.008, 0.02))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_grey(rng))


def _grey(rng: np.random.Generator) -> tuple[int, int, int]:
    level = int(rng.integers(110, 190))
    return level, level, level


_PAINTERS = {"filled": _paint_filled, "outline": _paint_outline, "sketch": _paint_sketch,
             "textured": _paint_textured, "shaded": _paint_shaded}


def write_shapes(folder: str | Path, num_samples: int, split: str = "train", fmt: str = "csv", seed: int = 0,
                 image_size: int = 64, samples_per_shard: int = 1000, image_format: str = "png",
                 style: str | tuple = "filled", config: ShapesConfig | None = None) -> str:
    """Write ``num_samples`` shapes as an on-disk image-caption dataset; returns its ``--train-data`` spec.

    ``fmt="csv"``: ``images/*.png`` and ``captions.csv`` (filepath,caption; paths relative to the CSV);
    ``"folder"``: ``KEY.png`` + ``KEY.txt`` pairs; ``"wds"``: WebDataset tar shards in img2dataset's
    layout (``KEY.png``, ``KEY.txt``, ``KEY.json``) plus ``sizes.json``, spec ``folder/{00000..0000N}.tar``.
    ``style`` and ``config`` are those of ``ShapesDataset`` (e.g. ``config=world("hard")``).
    """
    data = ShapesDataset(num_samples, split, seed, image_size, config=config, style=style)
    samples = ((f"{i:09d}", data.image(i), data.caption(i), {"caption": data.caption(i), **data.attributes(i)})
               for i in range(num_samples))
    root = _prepare(folder, fmt, ("csv", "folder", "wds"), image_format, num_samples)
    if fmt == "wds":
        shard_samples = (({"txt": c, "json": json.dumps(m)}, k, im) for k, im, c, m in samples)
        return _write_shards(root, shard_samples, samples_per_shard, image_format)
    if fmt == "folder":
        for key, image, caption, _ in samples:
            image.save(root / f"{key}.{image_format}")
            (root / f"{key}.txt").write_text(caption, encoding="utf-8")
        return str(root)
    rows = [(_save(image, root / "images", key, image_format), caption) for key, image, caption, _ in samples]
    return _write_csv(root / "captions.csv", ("filepath", "caption"), rows)


def write_classification(folder: str | Path, split: str, num_samples: int, fmt: str = "folder", by: str = "pair",
                         seed: int = 1, image_size: int = 64, samples_per_shard: int = 1000,
                         image_format: str = "png", style: str | tuple = "filled",
                         config: ShapesConfig | None = None) -> str:
    """Write a labelled shapes set for zero-shot evaluation; returns the dataset path or shard spec.

    ``fmt="folder"``: ``root/<class_name with _ for spaces>/KEY.png`` (sorted directory names give the
    label order); ``"wds"``: shards of ``KEY.png`` + ``KEY.cls`` (label) + ``KEY.txt`` (class name);
    ``"csv"``: ``labels.csv`` (filepath,label,classname); ``"clip_benchmark"``: CLIP_benchmark's ``wds/``
    layout, ``root/test/0.tar, 1.tar, ...`` (``train/`` for ``split="train"``) of ``KEY.png`` + ``KEY.cls``,
    ``test/nshards.txt``, and ``zeroshot_classification_templates.txt`` with ``{c}`` (returns ``root``, its
    ``--dataset_root``). Every format also writes ``classnames.txt`` (one name per line, in label order) and
    ``templates.txt``. The default ``seed=1`` keeps these images apart from the built-in training data (seed 0).
    ``style`` and ``config`` are those of ``ShapesDataset``.
    """
    _check_labelling(by)
    data = ShapesDataset(num_samples, split, seed, image_size, config=config, style=style)
    root = _prepare(folder, fmt, ("folder", "wds", "csv", "clip_benchmark"), image_format, num_samples)
    (root / "classnames.txt").write_text("\n".join(data.class_names(by)) + "\n", encoding="utf-8")
    (root / "templates.txt").write_text("\n".join(templates()) + "\n", encoding="utf-8")
    samples = ((f"{i:09d}", data.image(i), data.label(i, by), data.class_name(i, by)) for i in range(num_samples))
    if fmt == "wds":
        shard_samples = (({"cls": str(y), "txt": name}, k, im) for k, im, y, name in samples)
        return _write_shards(root, shard_samples, samples_per_shard, image_format)
    if fmt == "clip_benchmark":
        return _write_clip_benchmark(root, "train" if split == "train" else "test", samples, samples_per_shard,
                                     image_format)
    rows = []
    for key, image, label, name in samples:
        subfolder = root / (name.replace(" ", "_") if fmt == "folder" else "images")
        rows.append((_save(image, subfolder, key, image_format), label, name))
    if fmt == "folder":
        return str(root)
    return _write_csv(root / "labels.csv", ("filepath", "label", "classname"), rows)


def _write_clip_benchmark(root: Path, split: str, samples, samples_per_shard: int, image_format: str) -> str:
    """CLIP_benchmark's ``build_wds_dataset`` layout: ``SPLIT/{0..n-1}.tar`` + ``SPLIT/nshards.txt``, with
    ``classnames.txt`` and ``zeroshot_classification_templates.txt`` (``{c}`` placeholders) at the root."""
    (root / split).mkdir(exist_ok=True)
    shard_samples = (({"cls": str(y)}, k, im) for k, im, y, _ in samples)
    _write_shards(root / split, shard_samples, samples_per_shard, image_format, shard_name="{}.tar")
    nshards = len(json.loads((root / split / "sizes.json").read_text()))
    (root / split / "nshards.txt").write_text(f"{nshards}\n", encoding="utf-8")
    cb_templates = [t.replace("{}", "{c}") for t in templates()]
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(cb_templates) + "\n", encoding="utf-8")
    return str(root)


def _prepare(folder: str | Path, fmt: str, formats: tuple, image_format: str, num_samples: int) -> Path:
    if num_samples < 1:
        raise ValueError(f"need at least one sample to write, got num_samples={num_samples}")
    if fmt not in formats:
        raise ValueError(f"unknown format {fmt!r}; expected one of {formats}")
    if image_format not in ("png", "jpg", "webp"):
        raise ValueError(f"unknown image format {image_format!r}; expected png, jpg or webp")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _save(image: Image.Image, folder: Path, key: str, image_format: str) -> str:
    """Save ``image`` as ``folder/KEY.ext``; returns the path relative to ``folder``'s parent."""
    folder.mkdir(exist_ok=True)
    image.save(folder / f"{key}.{image_format}", quality=95)
    return f"{folder.name}/{key}.{image_format}"


def _write_csv(path: Path, header: tuple, rows: list) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _write_shards(root: Path, samples, samples_per_shard: int, image_format: str,
                  shard_name: str = "{:05d}.tar") -> str:
    """Write (texts by extension, key, image) samples into numbered tar shards and ``sizes.json``."""
    sizes, tar = {}, None
    for n, (texts, key, image) in enumerate(samples):
        if n % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            name = shard_name.format(n // samples_per_shard)
            tar, sizes[name] = tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT), 0
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG" if image_format == "jpg" else image_format.upper(), quality=95)
        for ext, payload in [(image_format, encoded.getvalue())] + [(e, t.encode()) for e, t in texts.items()]:
            member = tarfile.TarInfo(f"{key}.{ext}")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        sizes[name] += 1
    if tar is not None:
        tar.close()
    (root / "sizes.json").write_text(json.dumps(sizes, indent=1), encoding="utf-8")
    last = len(sizes) - 1
    return str(root / ("00000.tar" if last <= 0 else f"{{00000..{last:05d}}}.tar"))
