"""The approximate index: faiss IVF (inverted lists over k-means cells, inner product) beside the exact vectors,
with its recall@10 against exact search measured on sampled queries when it is built. An extra:
``pip install 'clipforge[search]'``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipforge.io.runs import write_files
from clipforge.search import exact, store

AUTO_THRESHOLD = 200_000  # items above which ``approximate="auto"`` builds it
FILE, IDS = "approximate.faiss", "approximate-ids.npy"
TARGET_RECALL = 0.95
SAMPLED_QUERIES = 200


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("the approximate index needs faiss: pip install 'clipforge[search]' (faiss-cpu)") from None
    return faiss


def live_vectors(segments: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The float32 vectors of ``rows`` (N,), in that order."""
    out = np.empty((len(rows), segments[0].shape[1]), dtype=np.float32)
    for number, segment in enumerate(segments):
        inside = np.nonzero(rows // store.SEGMENT_ROWS == number)[0]
        out[inside] = segment[rows[inside] % store.SEGMENT_ROWS]
    return out


def sample_queries(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Queries that are not stored vectors: normalised midpoints of random pairs of stored vectors."""
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, len(vectors), size=(count, 2))
    queries = vectors[pairs[:, 0]] + vectors[pairs[:, 1]]
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def recall_at_10(index, vectors: np.ndarray, queries: np.ndarray) -> float:
    """Mean fraction of the exact top-10 that the approximate top-10 finds."""
    truth = exact.scores([vectors], queries)  # (N, Q)
    found = index.search(np.ascontiguousarray(queries, dtype=np.float32), 10)[1]
    hits = [len(set(exact.top_k(truth[:, q], 10)[0].tolist()) & set(found[q].tolist())) for q in range(len(queries))]
    return float(np.mean(hits)) / min(10, len(vectors))


def build(folder: Path, ids: np.ndarray, vectors: np.ndarray, rows_used: int) -> dict:
    """Train and fill an IVF index on ``vectors`` (N, dim), raise ``nprobe`` until recall@10 reaches
    ``TARGET_RECALL`` on sampled queries, save it; returns what config.json records about it."""
    faiss = _faiss()
    dim = vectors.shape[1]
    cells = max(1, min(int(np.sqrt(len(vectors))), len(vectors) // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    train = vectors[rng.choice(len(vectors), size=min(len(vectors), 50 * cells), replace=False)]
    index.train(train)
    index.add(vectors)
    queries = sample_queries(vectors, SAMPLED_QUERIES)
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        recall = recall_at_10(index, vectors, queries)
        if recall >= TARGET_RECALL or nprobe >= cells:
            break
        nprobe = min(cells, nprobe * 2)
    def save_ids(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a temporary's name
            np.save(f, ids)

    write_files(folder, {FILE: lambda path: faiss.write_index(index, str(path)), IDS: save_ids})
    return {"kind": "faiss IVFFlat (inner product)", "cells": cells, "nprobe": nprobe, "items": int(len(ids)),
            "rows": int(rows_used), "recall@10": round(recall, 4), "recall_queries": SAMPLED_QUERIES}


def load(folder: Path, info: dict):
    """(faiss index with its nprobe, ids of its vectors in order), or None if its files do not match ``info``."""
    if not (folder / FILE).exists() or not (folder / IDS).exists():
        return None
    index, ids = _faiss().read_index(str(folder / FILE)), np.load(folder / IDS)
    if index.ntotal != len(ids) or len(ids) != info["items"]:
        return None
    index.nprobe = info["nprobe"]
    return index, ids


def is_current(info: dict | None, items: int, rows: int) -> bool:
    """Whether the approximate index described by ``info`` was built on the index as it is now."""
    return bool(info) and info["items"] == items and info["rows"] == rows


def refresh(folder: Path, mode: str) -> dict | None:
    """After an update: build the approximate index (``mode`` "always", or "auto" above
    ``AUTO_THRESHOLD`` items) unless it is current, or drop a stale one; records it in config.json."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"approximate must be 'auto', 'always' or 'never', got {mode!r}")
    config = store.read_config(folder)
    with store.connect(folder) as db:
        found = db.execute("SELECT id, row FROM items ORDER BY id").fetchall()
        rows_used = store.next_row(db, "images")
    wanted = mode == "always" or (mode == "auto" and len(found) >= AUTO_THRESHOLD)
    info = config.get("approximate")
    if wanted and len(found) and not is_current(info, len(found), rows_used):
        rows = np.array([r[1] for r in found], dtype=np.int64)
        vectors = live_vectors(store.open_segments(folder, "images", rows_used), rows)
        info = build(folder, np.array([r[0] for r in found], dtype=np.int64), vectors, rows_used)
    elif not wanted or not is_current(info, len(found), rows_used):
        info = None
    if info is None:
        remove(folder)
    if info != config.get("approximate"):
        store.write_config(folder, {**config, "approximate": info})
    return info


def remove(folder: Path) -> None:
    for name in (FILE, IDS):
        if (folder / name).exists():
            (folder / name).unlink()
