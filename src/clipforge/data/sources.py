"""Image-caption sources for training and evaluation: CSV/TSV files, caption folders, WebDataset tar
shards in img2dataset's layout (``KEY.jpg`` + ``KEY.txt``) and the built-in shapes data.

Bad samples (unreadable image, missing file, empty caption, ...) are skipped and counted by reason in a
``clipforge.data.samples.SkipCounter``, which stops with ``DataSourceError`` once most of a source is bad.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from clipforge.data.images import IMAGE_EXTENSIONS, list_images, load_image
from clipforge.data.samples import BadSample, SkipCounter, check_caption, decode_caption
from clipforge.data.shapes import BuiltinSpec, is_builtin_spec, parse_builtin_spec
from clipforge.data.shards import REMOTE, SHARD_IMAGE_KEYS, expand_shards, missing_shards, shard_size
from clipforge.data.tables import read_table

DEFAULT_BUILTIN_SAMPLES = 10_000


class _Strings:
    """A compact, read-only list of strings: one bytes blob plus offsets.

    Worker processes share it without the copy-on-access that Python lists of str objects cause.
    """

    def __init__(self, items: list[str]):
        encoded = [s.encode("utf-8", errors="surrogateescape") for s in items]
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self._offsets[i], self._offsets[i + 1]
        return self._blob[start:end].tobytes().decode("utf-8", errors="surrogateescape")


class MapSource:
    """A source with random access: ``len(source)`` samples, ``source.load(i) -> (image, caption)``.

    ``load`` raises ``BadSample`` for an unusable sample.
    """

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """How messages name sample ``i``."""
        return f"sample {i} of {self.name}"


class CsvSource(MapSource):
    """A CSV or TSV file of image paths and captions; relative paths resolve against the file's folder.

    Rows with a missing, empty or non-UTF-8 caption, or no image path, are skipped while indexing and
    recorded in ``counter``.
    """

    def __init__(self, path: str, img_key: str = "filepath", caption_key: str = "caption",
                 separator: str | None = None, max_pixels: int | None = None, counter: SkipCounter | None = None):
        self.name, self.max_pixels = path, max_pixels
        folder = os.path.dirname(os.path.abspath(path))
        paths, captions = [], []
        counter = counter if counter is not None else SkipCounter()
        table = read_table(path, separator)
        hint = "Pass the right names (csv_img_key / csv_caption_key) or csv_separator."
        img_col = table.column(img_key, "image path", hint)
        cap_cols = [table.column(key.strip(), "caption", hint) for key in caption_key.split(",")]
        for line, row in table.rows():
            where = f"{path} line {line}"
            try:
                image_path = row[img_col].strip() if img_col < len(row) else ""
                if not image_path:
                    raise BadSample("missing_file", f"{where} has no image path")
                caption = _row_captions(row, cap_cols, where)
            except BadSample as bad:
                counter.record(self.name, bad.reason, detail=str(bad))
                continue
            paths.append(os.path.join(folder, image_path))
            captions.append(caption)
        self._paths, self._captions = _Strings(paths), _Strings(captions)

    def __len__(self) -> int:
        return len(self._paths)

    def load(self, i: int) -> tuple[Image.Image, str]:
        caption = self._captions[i]
        captions = caption.split(_CAPTION_SEPARATOR) if _CAPTION_SEPARATOR in caption else caption
        return load_image(self._paths[i], self.max_pixels).convert("RGB"), captions

    def describe(self, i: int) -> str:
        return self._paths[i]


# Several captions of one row are stored joined by this control character, which no caption holds.
_CAPTION_SEPARATOR = "\x1e"


def _row_captions(row: list[str], columns: list[int], where: str) -> str:
    """The row's caption, or its several captions joined by ``_CAPTION_SEPARATOR``: one per caption column
    (``caption_key="caption_1,caption_2"``) or a JSON list of strings in a cell; empty ones are dropped."""
    cells = [row[c] if c < len(row) else None for c in columns]
    texts = [t for cell in cells for t in (split_caption_list(cell) if cell is not None else [None])]
    good = []
    for text in texts:
        try:
            good.append(check_caption(text, where).replace(_CAPTION_SEPARATOR, " "))
        except BadSample:
            if len(texts) == 1:
                raise
    if not good:
        raise BadSample("empty_caption", f"{where} has no non-empty caption")
    return _CAPTION_SEPARATOR.join(good)


def split_caption_list(text: str | list) -> list:
    """A JSON list of captions (``["a dog", "a brown dog"]``) as a list; any other text as itself, alone."""
    if isinstance(text, list):
        return text
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return [text]
        if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
            return value
    return [text]


class FolderSource(MapSource):
    """A folder searched recursively for images with a same-name ``.txt`` caption (``x.jpg`` + ``x.txt``).

    Images without a caption file are skipped while indexing and recorded in ``counter``.
    """

    def __init__(self, folder: str, max_pixels: int | None = None, counter: SkipCounter | None = None):
        self.name, self.max_pixels = folder, max_pixels
        counter = counter if counter is not None else SkipCounter()
        paths = []
        for image in list_images(folder):
            if os.path.exists(os.path.splitext(image)[0] + ".txt"):
                paths.append(image)
            else:
                counter.record(self.name, "missing_caption",
                               detail=f"{image} has no caption file {os.path.splitext(image)[0]}.txt")
        if not paths and not counter.seen[self.name]:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
        self._paths = _Strings(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def load(self, i: int) -> tuple[Image.Image, str]:
        path = self._paths[i]
        caption_path = os.path.splitext(path)[0] + ".txt"
        try:
            with open(caption_path, "rb") as f:
                caption = decode_caption(f.read(), caption_path)
        except FileNotFoundError:
            raise BadSample("missing_caption", f"{caption_path} does not exist") from None
        return load_image(path, self.max_pixels).convert("RGB"), caption

    def describe(self, i: int) -> str:
        return self._paths[i]


class BuiltinSource(MapSource):
    """The generated shapes data (training split), ``num_samples`` samples rendered at ``image_size`` in
    ``style`` (one of ``clipforge.data.shapes.STYLES`` or several) from ``world`` ("default" or "hard")."""

    def __init__(self, num_samples: int = DEFAULT_BUILTIN_SAMPLES, image_size: int = 64, seed: int = 0,
                 style: str | tuple = "filled", world: str = "default"):
        spec = BuiltinSpec(num_samples, style, world)
        self.name = str(spec)
        self.dataset = spec.dataset(num_samples, "train", seed=seed, image_size=image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int) -> tuple[Image.Image, str]:
        return self.dataset[i]


class ShardSource:
    """WebDataset tar shards in img2dataset's layout: ``KEY.jpg`` (or another image type) + ``KEY.txt``.

    ``spec`` is a shard path or URL with brace ranges (``shards/{00000..00127}.tar``) or a folder of
    ``.tar`` files (see ``clipforge.data.shards.expand_shards``). Shards are streamed with the
    ``webdataset`` package, so remote URLs (``pipe:``, ``https://``) work too.
    """

    def __init__(self, spec: str, max_pixels: int | None = None):
        self.name, self.max_pixels = spec, max_pixels
        self.urls = expand_shards(spec)
        missing = missing_shards(self.urls)
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shards of {spec!r} do not exist, "
                                    f"e.g. {missing[0]}; check the path and the brace range")

    def size(self) -> int | None:
        """Samples in all shards: from ``sizes.json`` beside them (shard name -> count), img2dataset's
        ``*_stats.json``, or by reading the tar headers of local shards; None if unknown (remote)."""
        listed = {}  # folder -> its sizes.json, read once per call
        sizes = [shard_size(u, listed) for u in self.urls]
        return None if None in sizes else sum(sizes)

    def raw_samples(self, urls, counter: SkipCounter) -> Iterator[dict]:
        """Undecoded samples (dicts of member bytes by extension, plus ``__key__``/``__url__``) of ``urls``
        in order; a shard that cannot be opened or read to its end is counted once in ``counter``."""
        try:
            import webdataset as wds
        except ImportError:
            raise ImportError("reading WebDataset shards for training needs the 'webdataset' package: "
                              "pip install 'clipforge[train]'") from None

        for url in urls:
            errors = []

            def keep_going(error: Exception) -> bool:
                errors.append(error)
                return True

            yield from wds.tarfile_samples([{"url": url}], handler=keep_going)
            if errors:
                counter.record(self.name, "unreadable_shard", detail=f"shard {url}: {errors[0]}")

    def describe(self, raw: dict) -> str:
        """How messages name a raw sample: ``URL:KEY``."""
        return f"{raw.get('__url__')}:{raw.get('__key__')}"

    def decode(self, raw: dict) -> tuple[Image.Image, str]:
        """The (image, caption) of a raw sample; raises ``BadSample``."""
        name = self.describe(raw)
        ext = next((e for e in SHARD_IMAGE_KEYS if e in raw), None)
        if ext is None:
            raise BadSample("missing_image", f"{name} has no {'/'.join(SHARD_IMAGE_KEYS)} member")
        caption = _shard_captions(raw, name)
        image = load_image(raw[ext], self.max_pixels, name=f"{name}.{ext}")
        return image.convert("RGB"), caption


def _shard_captions(raw: dict, name: str) -> str | list[str]:
    """A sample's ``txt`` caption, or without one the captions of its ``json`` member: a list of strings or
    an object whose ``captions`` (or ``caption``) holds one or a list."""
    if "txt" in raw or "json" not in raw:
        return decode_caption(raw.get("txt"), f"{name}.txt")
    try:
        value = json.loads(decode_caption(raw["json"], f"{name}.json"))
    except json.JSONDecodeError as e:
        raise BadSample("missing_caption", f"{name}.json is not valid JSON ({e})") from None
    if isinstance(value, dict):
        value = value.get("captions", value.get("caption"))
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    good = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not good:
        raise BadSample("missing_caption", f"{name} has no txt member and its json holds no caption strings")
    return good if len(good) > 1 else good[0]


def source_kind(part: str) -> str:
    """Which kind of source a spec part names: "builtin", "csv", "folder" or "shards"."""
    lower = part.lower()
    if is_builtin_spec(part):
        return "builtin"
    if lower.endswith((".tar", ".tar.gz", ".tgz")) or (".tar" in lower and ("{" in lower or REMOTE.match(part))):
        return "shards"
    if lower.endswith((".csv", ".tsv", ".tab")):
        return "csv"
    if os.path.isdir(part):
        has_tars = any(Path(part).glob("*.tar"))
        return "shards" if has_tars and not list_images(part) else "folder"
    raise FileNotFoundError(f"training data {part!r} is not a CSV/TSV file, a folder, WebDataset shards "
                            "(*.tar, brace ranges allowed) or 'builtin[:N][:STYLE]'" +
                            ("" if os.path.exists(part) else " (no such file or folder)"))


def open_sources(spec: str, *, counter: SkipCounter | None = None, max_pixels: int | None = None,
                 csv_img_key: str = "filepath", csv_caption_key: str = "caption", csv_separator: str | None = None,
                 builtin_samples: int | None = None, builtin_image_size: int = 64) -> list:
    """Open each ``::``-separated part of ``spec`` as a ``MapSource`` or ``ShardSource``.

    ``builtin[:N][:STYLE[+STYLE...]]`` and ``builtin-hard[...]`` (see
    ``clipforge.data.shapes.parse_builtin_spec``) use ``builtin_samples`` (default 10,000) unless N is
    written. Problems found while indexing (e.g. CSV rows with empty captions) are recorded in ``counter``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"training data spec must be a non-empty string, got {spec!r}")
    counter = counter if counter is not None else SkipCounter()
    sources = []
    for part in (p.strip() for p in spec.split("::")):
        kind = source_kind(part)
        if kind == "builtin":
            builtin = parse_builtin_spec(part)
            n = builtin.num_samples or builtin_samples or DEFAULT_BUILTIN_SAMPLES
            sources.append(BuiltinSource(n, builtin_image_size, style=builtin.styles, world=builtin.world))
        elif kind == "csv":
            sources.append(CsvSource(part, csv_img_key, csv_caption_key, csv_separator, max_pixels, counter))
        elif kind == "folder":
            sources.append(FolderSource(part, max_pixels, counter))
        else:
            sources.append(ShardSource(part, max_pixels))
    counter.check()
    return sources


def iter_pairs(spec: str, *, counter: SkipCounter | None = None, **options) -> Iterator[tuple[Image.Image, str]]:
    """Every good (image, caption) pair of ``spec`` in source order, skipping and counting bad samples.

    ``options`` are those of ``open_sources``. Raises ``DataSourceError`` once a source is
    mostly bad. Pass a ``counter`` to read the skip counts afterwards.
    """
    counter = counter if counter is not None else SkipCounter()
    for source in open_sources(spec, counter=counter, **options):
        if isinstance(source, ShardSource):
            samples = ((source.decode, raw) for raw in source.raw_samples(source.urls, counter))
        else:
            samples = ((source.load, i) for i in range(len(source)))
        for read, item in samples:
            try:
                pair = read(item)
            except BadSample as bad:
                counter.record(source.name, bad.reason, detail=str(bad))
                counter.check()
                continue
            counter.record(source.name)
            yield pair
