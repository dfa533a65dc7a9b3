"""The approximate index of the folder store, beside the exact vectors: faiss IVF-Flat (inverted lists over
k-means cells, inner product, in RAM), or IVF-PQ for more vectors than RAM (``clipforge.search.ivfpq``: compressed
codes on disk, memory-mapped, re-ranked exactly). Its recall@10 against exact search is measured on sampled
queries when it is built and recorded in config.json. An extra: ``pip install 'clipforge[search]'``."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np

from clipforge.io.runs import write_files
from clipforge.search import ivfpq, store

AUTO_THRESHOLD = 200_000  # items above which ``approximate="auto"`` builds it
FILE, IDS = "approximate.faiss", "approximate-ids.npy"
FLAT_KIND = "faiss IVFFlat (inner product)"
MODES = ("auto", "always", "never", "ivfpq")
TARGET_RECALL = 0.95
SAMPLED_QUERIES = 200


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"approximate must be 'auto', 'always' (IVF-Flat), 'ivfpq' or 'never', got {mode!r}")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("the approximate index needs faiss: pip install 'clipforge[search]' (faiss-cpu)") from None
    return faiss


def search(searcher, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) (Q, k) of a loaded searcher (``load``). Fewer queries than threads are split over
    the inverted lists they probe, more over the queries: faiss's default splits over queries only, which
    leaves one query to one thread."""
    faiss = _faiss()
    inner = searcher.index if isinstance(searcher, ivfpq.Reranked) else searcher
    faiss.extract_index_ivf(inner).parallel_mode = 1 if len(queries) < faiss.omp_get_max_threads() else 0
    return searcher.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def live_vectors(segments: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The float32 vectors of ``rows`` (N,), in that order."""
    return store.gather(segments, rows)


def sample_queries(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Queries that are not stored vectors: normalised midpoints of random pairs of stored vectors."""
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, len(vectors), size=(count, 2))
    queries = vectors[pairs[:, 0]] + vectors[pairs[:, 1]]
    return queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)


def build(folder: Path, ids: np.ndarray, vectors: np.ndarray, rows_used: int) -> dict:
    """Train and fill an IVF index on ``vectors`` (N, dim), double ``nprobe`` until recall@10 reaches
    ``TARGET_RECALL`` on sampled queries and bisect back to the fewest cells that still do, save it; returns
    what config.json records about it."""
    faiss = _faiss()
    dim = vectors.shape[1]
    cells = max(1, min(int(np.sqrt(len(vectors))), len(vectors) // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    train = vectors[rng.choice(len(vectors), size=min(len(vectors), 50 * cells), replace=False)]
    index.train(train)
    index.add(vectors)
    queries = np.ascontiguousarray(sample_queries(vectors, SAMPLED_QUERIES), dtype=np.float32)
    truth = ivfpq.exact_top([vectors], np.arange(len(vectors)), queries, 10)

    def recall_at(nprobe: int) -> float:
        index.nprobe = nprobe
        return ivfpq.recall_at_10(index.search(queries, 10)[1], truth)

    nprobe, short, recall = 1, None, 0.0
    while True:
        recall = recall_at(nprobe)
        if recall >= TARGET_RECALL or nprobe >= cells:
            break
        short, nprobe = nprobe, min(cells, nprobe * 2)
    if recall >= TARGET_RECALL and short is not None:
        nprobe, recall = ivfpq.fewest_probes(recall_at, short, nprobe, recall, TARGET_RECALL)
    index.nprobe = nprobe
    def save_ids(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a temporary's name
            np.save(f, ids)

    write_files(folder, {FILE: lambda path: faiss.write_index(index, str(path)), IDS: save_ids})
    return {"kind": FLAT_KIND, "cells": cells, "nprobe": nprobe, "items": int(len(ids)),
            "rows": int(rows_used), "recall@10": round(recall, 4), "recall_queries": SAMPLED_QUERIES}


def load(folder: Path, info: dict, ids: np.ndarray | None = None, rows: np.ndarray | None = None,
         generation: int = 0):
    """(searcher with its nprobe, ids of its vectors in order), or None if its files do not match ``info``. An
    IVF-PQ index is given the current items' ``ids`` and segment ``rows`` (of segment ``generation``) in id
    order: its labels are positions there, and its candidates are re-ranked by the vectors at those rows."""
    if info.get("kind") == ivfpq.KIND:
        index = ivfpq.read(_faiss(), folder, info["files"])
        if index is None or index.ntotal != info["items"] or ids is None or len(ids) != info["items"]:
            return None
        index.nprobe = info["nprobe"]
        return ivfpq.Reranked(index, ivfpq.StoredVectors(folder, index.d, generation), rows, info["rerank"]), ids
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


def refresh(folder: Path, mode: str, max_index_memory: int | None = None, progress: bool = True) -> dict | None:
    """After an update: build the approximate index that ``mode`` asks for (``choose``) unless it is current,
    or drop it; records it in config.json and removes the files of any other. ``progress``: the IVF-PQ
    build's bar on a terminal."""
    check_mode(mode)
    config = store.read_config(folder)
    with contextlib.closing(store.connect(folder)) as db:
        ids, rows = np.ascontiguousarray(store.int_columns(db, "SELECT id, row FROM items ORDER BY id").T)
        rows_used = store.next_row(db, "images")
    info, dim = config.get("approximate"), int(config["dim"])
    kind, limit = choose(mode, len(ids), dim, max_index_memory, info)
    current = (is_current(info, len(ids), rows_used) and info.get("kind") == kind
               and all((folder / name).exists() for name in _files(info)))
    if kind == ivfpq.KIND:
        chosen = ivfpq.plan(len(ids), dim, limit)
        if current and info["factory"] == chosen.factory:
            info = {**info, "max_index_memory": limit}
        else:
            segments = store.open_segments(folder, "images", rows_used)
            built = ivfpq.build(folder, segments, rows, chosen, _faiss(), sample_queries, TARGET_RECALL,
                                SAMPLED_QUERIES, progress)
            info = {**built, "items": int(len(ids)), "rows": int(rows_used), "max_index_memory": limit}
    elif kind == FLAT_KIND and not current:
        vectors = live_vectors(store.open_segments(folder, "images", rows_used), rows)
        info = build(folder, ids, vectors, rows_used)
    elif kind is None:
        info = None
    if info != config.get("approximate"):
        store.write_config(folder, {**config, "approximate": info})
    remove(folder, keep=_files(info))
    return info


def choose(mode: str, items: int, dim: int, max_index_memory: int | None, info: dict | None):
    """(kind of approximate index to have, or None; the memory it may take). "always" is IVF-Flat, "ivfpq"
    IVF-PQ, "never" none. "auto" keeps an IVF-PQ index that was asked for before (with its memory limit);
    otherwise it builds IVF-Flat from ``AUTO_THRESHOLD`` items, or IVF-PQ where ``max_index_memory`` is given and
    IVF-Flat (its float32 vectors in RAM) would take more."""
    had_pq = bool(info) and info.get("kind") == ivfpq.KIND
    if max_index_memory is None and had_pq:
        max_index_memory = info.get("max_index_memory")
    if mode == "never" or items == 0:
        return None, max_index_memory
    if mode == "always":
        return FLAT_KIND, max_index_memory
    if mode == "ivfpq" or had_pq:
        return ivfpq.KIND, max_index_memory
    if items < AUTO_THRESHOLD:
        return None, max_index_memory
    if max_index_memory is not None and flat_bytes(items, dim) > max_index_memory:
        return ivfpq.KIND, max_index_memory
    return FLAT_KIND, max_index_memory


def flat_bytes(items: int, dim: int) -> int:
    """What an IVF-Flat index of ``items`` vectors holds in RAM: float32 vectors and 64-bit ids."""
    return items * (4 * dim + 8)


def describe(info: dict) -> str:
    """One line on the approximate index ``info`` describes: what was chosen, what it measured."""
    if info.get("kind") == ivfpq.KIND:
        return ivfpq.describe(info)
    if info.get("kind") == FLAT_KIND:
        return (f"approximate index: IVF-Flat, {info['cells']} cells ({info['items']:,} vectors), nprobe "
                f"{info['nprobe']}: recall@10 {info['recall@10']:.3f}")
    return f"approximate index: {info.get('kind')}, recall@10 {info['recall@10']:.3f}"


def _files(info: dict | None) -> set[str]:
    if not info:
        return set()
    return set(info["files"].values()) if info.get("kind") == ivfpq.KIND else {FILE, IDS}


def remove(folder: Path, keep: set[str] = frozenset()) -> None:
    """Remove the approximate index files (and builds cut short) in ``folder``, except those in ``keep``."""
    for path in folder.glob("approximate*"):
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
