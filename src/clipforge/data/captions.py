"""Caption sets for retrieval evaluation: COCO/Flickr30k Karpathy-split JSON and CSV/TSV, several captions
per image."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipforge.data.images import ImageRef
from clipforge.data.tables import IMAGE_COLUMNS, read_table, resolve_path

CAPTION_COLUMNS = ("caption", "title", "text")


@dataclass
class CaptionData:
    """Images and captions; ``image_of_caption[j]`` indexes the image that caption ``j`` describes."""

    images: list[ImageRef]
    captions: list[str]
    image_of_caption: list[int]
    source: str = ""


def read_karpathy_json(path: str | Path, split: str = "test", image_root: str | Path | None = None) -> CaptionData:
    """COCO/Flickr30k Karpathy-split JSON: ``{"images": [{"filename", "filepath"?, "split", "sentences"}]}``."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None
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
    table = read_table(path)
    image_col = table.column(IMAGE_COLUMNS, "image path")
    caption_col = table.column(CAPTION_COLUMNS, "caption")
    index: dict[str, int] = {}
    captions, owner = [], []
    for image, caption in zip(table.values(image_col), table.values(caption_col)):
        image = resolve_path(image, path.parent)
        owner.append(index.setdefault(image, len(index)))
        captions.append(caption)
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
