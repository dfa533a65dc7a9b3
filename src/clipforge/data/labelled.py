"""Labelled training sources for a supervised classifier (``--loss classify``): any set that
``clipforge.data.classification.read_classification`` reads, or the built-in shapes labelled by pair.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from clipforge.data.classification import read_classification
from clipforge.data.images import load_image
from clipforge.data.sources import MapSource, open_sources, source_kind


class LabelledSource(MapSource):
    """Images with integer labels into ``classnames``: ``load(i) -> (image, label)``."""

    classnames: list[str]


class ClassificationSource(LabelledSource):
    """The images of a class-folder set, a CSV with labels or ``.cls`` shards, with their targets."""

    def __init__(self, path: str, classnames=None, max_pixels: int | None = None):
        data = read_classification(path, classnames)
        self.name, self.max_pixels, self.classnames = str(path), max_pixels, list(data.classnames)
        self._images, self._targets = data.images, np.asarray(data.targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._images)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return load_image(self._images[i], self.max_pixels).convert("RGB"), int(self._targets[i])

    def describe(self, i: int) -> str:
        return str(self._images[i])


class ShapesLabelledSource(LabelledSource):
    """A built-in data source's shapes labelled by colour-shape pair (classes: its split's pairs, sorted)."""

    def __init__(self, source: MapSource):
        self.name, self.dataset = source.name, source.dataset
        self.classnames = self.dataset.class_names("pair")

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return self.dataset.image(i), self.dataset.label(i, "pair")


def open_labelled_source(spec: str, classnames=None, *, max_pixels: int | None = None,
                         builtin_samples: int | None = None, builtin_image_size: int = 64) -> LabelledSource:
    """Open ``spec`` as a labelled source: ``builtin[...]`` (the same spec as for image-caption training) or
    a path ``read_classification`` reads, with ``classnames`` as it takes them (numbered labels need them)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"labelled training data must be a non-empty string, got {spec!r}")
    if "::" in spec:
        raise ValueError(f"{spec!r}: a classifier trains on one labelled set (its classes are the set's); "
                         "'::' mixtures are for image-caption data")
    spec = spec.strip()
    if _is_builtin(spec):
        if classnames is not None:
            raise ValueError(f"{spec!r}: the built-in data's classes are its colour-shape pairs; give no class names")
        (source,) = open_sources(spec, builtin_samples=builtin_samples, builtin_image_size=builtin_image_size)
        return ShapesLabelledSource(source)
    return ClassificationSource(spec, classnames, max_pixels)


def _is_builtin(spec: str) -> bool:
    try:
        return source_kind(spec) == "builtin"
    except FileNotFoundError:  # no image-caption source; read_classification says what is wrong
        return False
