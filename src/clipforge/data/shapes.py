"""The built-in dataset: generated scenes of one coloured shape with a natural-language caption.

Some colour-shape pairs never appear in the training split, so zero-shot classification on them
(class names such as "red triangle") measures transfer to combinations never seen with an image, in
the spirit of CLIP's zero-shot evaluation (Radford et al. 2021, section 3.1).
"""
from __future__ import annotations

import csv
import io
import json
import math
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLITS = {"train": 0, "heldout": 1, "all": 2}
LABELLINGS = ("pair", "colour", "shape")

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


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class ShapesDataset:
    """``num_samples`` generated (image, caption) pairs of one split, deterministic from ``seed``.

    Metadata for all samples is drawn at construction (vectorised, instant); images are rendered on
    access from (seed, split, index), so sample ``i`` is the same in any dataset length. Indexing
    returns ``(PIL.Image RGB of image_size x image_size, caption)``.
    """

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0, image_size: int = 64,
                 config: ShapesConfig | None = None):
        _check_split(split)
        if num_samples < 0 or image_size < 8:
            raise ValueError(f"need num_samples >= 0 and image_size >= 8, got {num_samples}, {image_size}")
        self.num_samples, self.split, self.seed, self.image_size = num_samples, split, seed, image_size
        self.config = config or ShapesConfig()
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
        """The ground truth of sample ``i``: dict(colour, shape, size, position)."""
        i = self._index(i)
        colour, shape = self._pairs[self._codes["pair"][i]]
        size = self.config.sizes[self._codes["size"][i]][0]
        position = self.config.positions[self._codes["position"][i]][0]
        return {"colour": colour, "shape": shape, "size": size, "position": position}

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
        """Sorted class names of this split (see the module-level :func:`class_names`)."""
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
        """The index of sample ``i``'s class in :meth:`class_names` for the same labelling."""
        return self._class_index[by][self.class_name(i, by)]

    def image(self, i: int) -> Image.Image:
        """Render sample ``i``: light tinted noisy background, one jittered, slightly rotated shape."""
        i = self._index(i)
        cfg, a = self.config, self.attributes(i)
        rng = self._rng(i)
        side = 2 * self.image_size  # drawn at twice the size, then box-filtered: smooth edges
        background = tuple(int(v) for v in rng.integers(212, 250, 3))
        colour = np.asarray(dict(cfg.colours)[a["colour"]]) + rng.integers(-12, 13, 3)
        fill = tuple(int(v) for v in np.clip(colour, 0, 255))
        (fx, fy) = dict((p[0], p[1]) for p in cfg.positions)[a["position"]]
        cx, cy = (np.array([fx, fy]) + rng.uniform(-cfg.jitter, cfg.jitter, 2)) * side
        radius = dict(cfg.sizes)[a["size"]] * side * rng.uniform(0.9, 1.1)
        angle = rng.uniform(-15.0, 15.0)
        canvas = Image.new("RGB", (side, side), background)
        _draw_shape(ImageDraw.Draw(canvas), a["shape"], float(cx), float(cy), float(radius), angle, fill)
        canvas = canvas.resize((self.image_size, self.image_size), Image.Resampling.BOX)
        noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, cfg.noise_std, (self.image_size,) * 2 + (3,))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


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


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.05] * 4, angle + 45), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, [r * 1.15] * 3, angle), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.15, r * 0.5] * 5, angle), fill=fill)
    elif shape == "cross":
        draw.polygon(_plus(cx, cy, r, angle), fill=fill)
    else:
        raise ValueError(f"cannot draw shape {shape!r}; known shapes: {_SHAPES}")


def write_shapes(folder: str | Path, num_samples: int, split: str = "train", fmt: str = "csv", seed: int = 0,
                 image_size: int = 64, samples_per_shard: int = 1000, image_format: str = "png") -> str:
    """Write ``num_samples`` shapes as an on-disk image-caption dataset; returns its ``--train-data`` spec.

    ``fmt="csv"``: ``images/*.png`` and ``captions.csv`` (filepath,caption; paths relative to the CSV);
    ``"folder"``: ``KEY.png`` + ``KEY.txt`` pairs; ``"wds"``: WebDataset tar shards in img2dataset's
    layout (``KEY.png``, ``KEY.txt``, ``KEY.json``) plus ``sizes.json``, spec ``folder/{00000..0000N}.tar``.
    """
    data = ShapesDataset(num_samples, split, seed, image_size)
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
                         image_format: str = "png") -> str:
    """Write a labelled shapes set for zero-shot evaluation; returns the dataset path or shard spec.

    ``fmt="folder"``: ``root/<class_name with _ for spaces>/KEY.png`` (sorted directory names give the
    label order); ``"wds"``: shards of ``KEY.png`` + ``KEY.cls`` (label) + ``KEY.txt`` (class name);
    ``"csv"``: ``labels.csv`` (filepath,label,classname); ``"clip_benchmark"``: CLIP_benchmark's ``wds/``
    layout, ``root/test/0.tar, 1.tar, ...`` (``train/`` for ``split="train"``) of ``KEY.png`` + ``KEY.cls``,
    ``test/nshards.txt``, and ``zeroshot_classification_templates.txt`` with ``{c}`` (returns ``root``, its
    ``--dataset_root``). Every format also writes ``classnames.txt`` (one name per line, in label order) and
    ``templates.txt``. The default ``seed=1`` keeps these images apart from the built-in training data (seed 0).
    """
    _check_labelling(by)
    data = ShapesDataset(num_samples, split, seed, image_size)
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
