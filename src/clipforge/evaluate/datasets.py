"""Evaluation data readers: classification sets (image folders, WebDataset ``.cls`` shards, CSV) and caption sets
(COCO/Flickr30k Karpathy-split JSON, CSV), plus batched image encoding that skips unreadable files.

Classes are identified by a key (folder name, CSV label, or WebDataset label id) and matched by key, never by
position, so a split that lacks a class lines up with the others.
"""
from __future__ import annotations

import csv
import json
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ..transforms import load_image
from ..tokenizer import get_tokenizer
from ..zeroshot import check_classnames, classname_set_names, eval_mode, load_classnames, model_device

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
IMAGE_COLUMNS = ("filepath", "image", "path", "filename")
LABEL_COLUMNS = ("label", "class")
CLASSNAME_COLUMN = "classname"
CAPTION_COLUMNS = ("caption", "title", "text")


@dataclass(frozen=True)
class ImageRef:
    """An image file, or a member of a tar shard (``member`` set, bytes at ``offset``, ``size`` long)."""

    path: str
    member: str | None = None
    offset: int = 0
    size: int = 0

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


def open_image(ref: ImageRef) -> Image.Image:
    """The decoded image behind ``ref``; FileNotFoundError or ValueError for a missing or unreadable one."""
    if ref.member is None:
        return load_image(ref.path)
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.size)
    try:
        return load_image(data)
    except ValueError as e:
        raise ValueError(f"{ref}: {e}") from None


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


@dataclass
class CaptionData:
    """Images and captions; ``image_of_caption[j]`` indexes the image that caption ``j`` describes."""

    images: list[ImageRef]
    captions: list[str]
    image_of_caption: list[int]
    source: str = ""


# ---------------------------------------------------------------- class names

def read_classnames(spec: str | Path) -> dict[str, str] | list[str]:
    """A class-name mapping: a dict (folder/label key -> name) or a list (names by sorted key or label id).

    ``spec`` is a shipped set name (``imagenet1k``, ``pets``, ...), a JSON file (a dict or a list), or a text
    file: lines ``key<TAB>name`` (a dict), else one name per line (a list). A dict or list passes through.
    """
    if isinstance(spec, (dict, list)):
        return spec
    text = str(spec)
    if text in classname_set_names():
        return load_classnames(text)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"class names {text!r}: no such file and not a shipped set "
                                f"({', '.join(classname_set_names())})")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, (dict, list)):
            raise ValueError(f"class-name file {path}: expected a JSON object (key -> name) or list of names")
        return {str(k): v for k, v in data.items()} if isinstance(data, dict) else data
    lines = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and all("\t" in line for line in lines):
        return dict(line.split("\t", 1) for line in lines)
    return [line.strip() for line in lines]


def _is_label_id(key: str) -> bool:
    return key.isdigit()


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
    counts = torch.bincount(torch.tensor(data.targets, dtype=torch.long), minlength=len(data.class_keys))
    empty = [k for k, n in zip(data.class_keys, counts.tolist()) if n == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        warnings.warn(f"{data.source}: {len(empty)} of {len(data.class_keys)} classes have no images ({shown}); "
                      "they stay in the classifier, so predictions line up with the other splits", stacklevel=3)


def _build(refs: list[ImageRef], labels: list[str], spec, where: str, folders: list[str] | None = None,
           needs_names: bool = False) -> ClassificationData:
    if not refs:
        raise ValueError(f"{where}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    keys, names = _resolve_classes(sorted(set(labels) | set(folders or [])), spec, where, needs_names)
    index = {k: i for i, k in enumerate(keys)}
    data = ClassificationData(refs, [index[k] for k in labels], keys, names, where)
    _warn_empty_classes(data)
    return data


# ---------------------------------------------------------------- classification readers

def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_image_folder(root: str | Path, classnames=None) -> ClassificationData:
    """``root/<class>/<image>``, the ImageNet validation layout; an empty class folder is still a class."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no class folders; expected the layout {root}/<class name>/<image files>")
    refs, labels = [], []
    for folder in folders:
        for path in sorted(p for p in (root / folder).rglob("*") if p.is_file() and _is_image(p)):
            refs.append(ImageRef(str(path)))
            labels.append(folder)
    return _build(refs, labels, classnames, str(root), folders)


def _open_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        header = f.readline()
        f.seek(0)
        reader = csv.DictReader(f, delimiter="\t" if "\t" in header else ",")
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def _column(columns: list[str], wanted: tuple[str, ...], path: Path, what: str) -> str:
    for name in wanted:
        if name in columns:
            return name
    raise ValueError(f"{path}: no {what} column; expected one of {list(wanted)} in the header, found {columns}")


def _resolve_path(value: str, base: Path) -> str:
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


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
    rows, columns = _open_csv(path)
    image_col = _column(columns, IMAGE_COLUMNS, path, "image path")
    label_col = _column(columns, LABEL_COLUMNS, path, "label")
    for i, row in enumerate(rows):
        if not (row[label_col] or "").strip():
            raise ValueError(f"{path}: row {i + 2} has an empty label; every image needs its class")
    labels = [row[label_col].strip() for row in rows]
    if classnames is None and CLASSNAME_COLUMN in columns:
        classnames = _names_by_label(labels, [row[CLASSNAME_COLUMN].strip() for row in rows], path)
    refs = [ImageRef(_resolve_path(row[image_col], path.parent)) for row in rows]
    return _build(refs, labels, classnames, str(path))


def expand_shards(spec: str | Path) -> list[Path]:
    """Shard paths from a ``.tar`` file, a folder of ``.tar`` files or a brace pattern ``data-{000..009}.tar``."""
    text = str(spec)
    match = re.search(r"\{(\d+)\.\.(\d+)\}", text)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first)
        return [Path(text[:match.start()] + str(i).zfill(width) + text[match.end():])
                for i in range(int(first), int(last) + 1)]
    path = Path(text)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return [path]


def _scan_shard(shard: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Members of one shard grouped WebDataset-style: key (path up to the first dot of the name) -> ext -> info."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, _, name = info.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if dot and not stem.startswith("__"):
                samples.setdefault(f"{folder}/{stem}", {})[ext.lower()] = info
    return samples


def _read_member(shard: Path, info: tarfile.TarInfo) -> bytes:
    with open(shard, "rb") as f:
        f.seek(info.offset_data)
        return f.read(info.size)


def read_webdataset(spec: str | Path, classnames=None) -> ClassificationData:
    """WebDataset classification shards: samples with an image and a ``.cls`` integer label (class names needed)."""
    shards = expand_shards(spec)
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise FileNotFoundError(f"{spec}: WebDataset shards not found {missing[:3]}")
    refs, labels = [], []
    for shard in shards:
        for key, members in _scan_shard(shard).items():
            image_ext = next((e for e in members if f".{e}" in IMAGE_EXTENSIONS), None)
            if image_ext is None or "cls" not in members:
                continue
            label = _read_member(shard, members["cls"]).decode("utf-8").strip()
            if not _is_label_id(label):
                raise ValueError(f"{shard}: sample {key} has label {label!r}; .cls must hold a non-negative integer")
            info = members[image_ext]
            refs.append(ImageRef(str(shard), info.name, info.offset_data, info.size))
            labels.append(str(int(label)))
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


# ---------------------------------------------------------------- caption readers

def read_karpathy_json(path: str | Path, split: str = "test", image_root: str | Path | None = None) -> CaptionData:
    """COCO/Flickr30k Karpathy-split JSON: ``{"images": [{"filename", "filepath"?, "split", "sentences"}]}``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, dict) or not isinstance(entries.get("images"), list):
        raise ValueError(f"{path}: expected Karpathy's format {{'images': [{{'filename', 'sentences', ...}}]}}")
    chosen = [e for e in entries["images"] if split is None or e.get("split", split) == split]
    if not chosen:
        splits = sorted({str(e.get("split")) for e in entries["images"]})
        raise ValueError(f"{path}: no images in split {split!r}; splits present: {splits}")
    refs, captions, owner = [], [], []
    for i, entry in enumerate(chosen):
        refs.append(ImageRef(str(root / entry.get("filepath", "") / entry["filename"])))
        texts = [s["raw"] if isinstance(s, dict) else str(s) for s in entry.get("sentences", [])]
        if not texts:
            raise ValueError(f"{path}: image {entry['filename']} has no sentences")
        captions += texts
        owner += [i] * len(texts)
    return CaptionData(refs, captions, owner, str(path))


def read_caption_csv(path: str | Path) -> CaptionData:
    """A CSV/TSV with ``filepath`` and ``caption`` (or OpenCLIP's ``title``) columns, several rows per image."""
    path = Path(path)
    rows, columns = _open_csv(path)
    image_col = _column(columns, IMAGE_COLUMNS, path, "image path")
    caption_col = _column(columns, CAPTION_COLUMNS, path, "caption")
    index: dict[str, int] = {}
    captions, owner = [], []
    for row in rows:
        image = _resolve_path(row[image_col], path.parent)
        owner.append(index.setdefault(image, len(index)))
        captions.append(row[caption_col])
    if not index:
        raise ValueError(f"{path}: no rows")
    return CaptionData([ImageRef(p) for p in index], captions, owner, str(path))


def read_captions(path: str | Path, split: str = "test", image_root: str | Path | None = None) -> CaptionData:
    """A caption set from a Karpathy-split ``.json`` or a ``.csv``/``.tsv``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"caption file {p} does not exist")
    if p.suffix.lower() == ".json":
        return read_karpathy_json(p, split, image_root)
    if p.suffix.lower() in (".csv", ".tsv"):
        return read_caption_csv(p)
    raise ValueError(f"caption set {p}: expected a Karpathy-split .json or a .csv/.tsv with filepath and caption")


# ---------------------------------------------------------------- image encoding

class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, refs: list[ImageRef], preprocess: Callable):
        self.refs, self.preprocess = refs, preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(open_image(self.refs[i])), None
        except (OSError, ValueError) as e:
            message = str(e)
            return i, None, message if self.refs[i].path in message else f"{self.refs[i]}: {message}"


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    if not good:
        return torch.empty(0, dtype=torch.long), None, errors
    return torch.tensor([i for i, _ in good]), torch.stack([x for _, x in good]), errors


@dataclass
class EncodedImages:
    """L2-normalised image features of the readable images; ``kept`` indexes them into the input list."""

    features: torch.Tensor
    kept: torch.Tensor
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def encode_images(model, preprocess: Callable, refs: list[ImageRef], batch_size: int = 64, workers: int = 0,
                  normalize: bool = True) -> EncodedImages:
    """Encode images in batches (optionally with DataLoader workers), skipping and listing unreadable ones."""
    loader = torch.utils.data.DataLoader(_ImageSet(refs, preprocess), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate, shuffle=False)
    device = model_device(model)
    features, kept, skipped = [], [], []
    with eval_mode(model):
        for index, images, errors in loader:
            skipped += errors
            if images is not None:
                out = model.encode_image(images.to(device)).float()
                features.append(F.normalize(out, dim=-1) if normalize else out)
                kept.append(index)
    if not features:
        raise ValueError(f"none of the {len(refs)} images could be read; first error: {skipped[0] if skipped else '-'}")
    return EncodedImages(torch.cat(features), torch.cat(kept), skipped)


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features (N, D), long texts truncated to the model's context length."""
    tokenizer = get_tokenizer(int(getattr(model, "context_length", 77)))
    device = model_device(model)
    with eval_mode(model):
        chunks = [F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(), dim=-1)
                  for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks)
