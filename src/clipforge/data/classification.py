"""Labelled image sets for evaluation: class folders, CSV/TSV with labels, WebDataset ``.cls`` shards.

Classes are identified by a key (folder name, CSV label, or WebDataset label id) and matched by key, never by
position, so a split that lacks a class lines up with the others. Numbered keys (``0007``, ``7``) are label
ids: line 7 of a plain class-name list names them.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from clipforge.data.classnames import check_classnames, read_classnames
from clipforge.data.images import IMAGE_EXTENSIONS, ImageRef, is_image_name, list_images
from clipforge.data.shards import expand_shards, missing_shards, scan_tar
from clipforge.data.tables import IMAGE_COLUMNS, read_table, resolve_path

LABEL_COLUMNS = ("label", "class")
CLASSNAME_COLUMN = "classname"


@dataclass
class ClassificationData:
    """Images with integer targets into ``class_keys``; ``classnames`` are the texts used in prompts."""

    images: list[ImageRef]
    targets: list[int]
    class_keys: list[str]
    classnames: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)


def _is_label_id(key: str) -> bool:
    return key.isdigit()


def _canonical(keys: list[str]) -> list[str]:
    """Numbered keys as label ids (``0007`` -> ``7``) when every key is a number; others unchanged."""
    return [str(int(k)) for k in keys] if keys and all(_is_label_id(k) for k in keys) else keys


def _sorted_keys(keys) -> list[str]:
    keys = set(keys)
    if all(_is_label_id(k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def _resolve_classes(found: list[str], spec, where: str, needs_names: bool = False) -> tuple[list[str], list[str]]:
    """(class keys, class names) for the keys ``found`` in a dataset and an optional class-name ``spec``."""
    if spec is None:
        if needs_names:
            raise ValueError(f"{where}: the labels are integers; pass class names (--classnames FILE), "
                             "one name per line for labels 0, 1, 2, ...")
        keys = _sorted_keys(found)
        return keys, [k.replace("_", " ") for k in keys]
    mapping = read_classnames(spec)
    if isinstance(mapping, dict):
        keys, names = list(mapping), [str(v) for v in mapping.values()]
    elif found and all(_is_label_id(k) for k in found):
        keys, names = [str(i) for i in range(len(mapping))], list(mapping)
    else:
        keys, names = sorted(set(found)), list(mapping)
        if len(keys) != len(names):
            raise ValueError(f"{where}: {len(keys)} class folders/labels but {len(names)} names in {spec}; a plain "
                             "list names the sorted folders in order, so use a JSON dict or 'folder<TAB>name' "
                             "lines when the counts differ")
    unknown = sorted(set(found) - set(keys))
    if unknown:
        raise ValueError(f"{where}: classes {unknown[:5]} are not in the class names {spec}; add them there")
    return keys, check_classnames(names, f"class names {spec}", unique=False)


def _warn_empty_classes(data: ClassificationData) -> None:
    counts = Counter(data.targets)
    empty = [k for i, k in enumerate(data.class_keys) if counts[i] == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        warnings.warn(f"{data.source}: {len(empty)} of {len(data.class_keys)} classes have no images ({shown}); "
                      "they stay in the classifier, so predictions line up with the other splits", stacklevel=3)


def _build(refs: list[ImageRef], labels: list[str], spec, where: str, folders: list[str] | None = None,
           needs_names: bool = False) -> ClassificationData:
    if not refs:
        raise ValueError(f"{where}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    labels, folders = _canonical(labels), _canonical(folders or [])
    keys, names = _resolve_classes(sorted(set(labels) | set(folders)), spec, where, needs_names)
    index = {k: i for i, k in enumerate(keys)}
    data = ClassificationData(refs, [index[k] for k in labels], keys, names, where)
    _warn_empty_classes(data)
    return data


def read_image_folder(root: str | Path, classnames=None) -> ClassificationData:
    """``root/<class>/<image>``, the ImageNet validation layout; an empty class folder is still a class."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders; expected the layout {root}/<class name>/<image files>")
    refs, labels = [], []
    for folder in folders:
        for path in list_images(root / folder):
            refs.append(ImageRef(path))
            labels.append(folder)
    return _build(refs, labels, classnames, str(root), folders)


def _names_by_label(labels: list[str], names: list[str], path: Path) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for label, name in zip(labels, names):
        if mapping.setdefault(label, name) != name:
            raise ValueError(f"{path}: label {label} is named both {mapping[label]!r} and {name!r}")
    return {k: mapping[k] for k in _sorted_keys(mapping)}


def read_classification_csv(path: str | Path, classnames=None) -> ClassificationData:
    """A CSV (or TSV) with a header holding ``filepath`` and ``label``; relative paths are from the CSV's folder.

    An optional ``classname`` column names each label, used when ``classnames`` is not given.
    """
    path = Path(path)
    table = read_table(path)
    image_col = table.column(IMAGE_COLUMNS, "image path")
    label_col = table.column(LABEL_COLUMNS, "label")
    labels = table.values(label_col)
    for line, label in enumerate(labels, start=2):
        if not label:
            raise ValueError(f"{path}: row {line} has an empty label; every image needs its class")
    if classnames is None and CLASSNAME_COLUMN in table.header:
        classnames = _names_by_label(_canonical(labels), table.values(table.header.index(CLASSNAME_COLUMN)), path)
    refs = [ImageRef(resolve_path(p, path.parent)) for p in table.values(image_col)]
    return _build(refs, labels, classnames, str(path))


def read_webdataset(spec: str | Path, classnames=None) -> ClassificationData:
    """WebDataset classification shards: samples with an image and a ``.cls`` integer label (class names needed)."""
    shards = expand_shards(spec)
    missing = missing_shards(shards)
    if not shards or missing:
        raise FileNotFoundError(f"{spec}: WebDataset shards not found {missing[:3]}")
    refs, labels = [], []
    for shard in shards:
        for key, members in scan_tar(shard).items():
            image_ext = next((e for e in members if is_image_name(f"x.{e}")), None)
            if image_ext is None or "cls" not in members:
                continue
            cls = members["cls"]
            label = ImageRef(shard, cls.name, cls.offset, cls.size).read().decode("utf-8", errors="replace").strip()
            if not _is_label_id(label):
                raise ValueError(f"{shard}: sample {key} has label {label!r}; .cls must hold a non-negative integer")
            image = members[image_ext]
            refs.append(ImageRef(shard, image.name, image.offset, image.size))
            labels.append(label)
    return _build(refs, labels, classnames, str(spec), needs_names=True)


def read_classification(path: str | Path, classnames=None) -> ClassificationData:
    """Any supported classification set: an image folder, a CSV/TSV, or WebDataset shards (.tar, folder, pattern)."""
    text = str(path)
    p = Path(text)
    if "{" not in text and not p.exists():
        raise FileNotFoundError(f"dataset {text} does not exist")
    if p.is_dir():
        if any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir()):
            return read_image_folder(p, classnames)
        if any(p.glob("*.tar")):
            return read_webdataset(p, classnames)
        raise ValueError(f"{p}: no class folders ({p}/<class>/<images>) and no WebDataset .tar shards; "
                         "nothing to evaluate")
    if p.suffix.lower() in (".csv", ".tsv"):
        return read_classification_csv(p, classnames)
    if p.suffix.lower() == ".tar":
        return read_webdataset(text, classnames)
    raise ValueError(f"dataset {text}: unsupported format; give an image folder, a .csv/.tsv or .tar shards")
