"""The compressed approximate index of the folder store, for more vectors than RAM: faiss IVF-PQ (inverted lists
over k-means cells, each vector a product-quantised code), built partition by partition from the memory-mapped
float16 segments, its lists merged into one file on disk and memory-mapped when searched, as autofaiss and LAION's
indexes are. The best candidates by PQ score are re-scored exactly against the stored vectors, so recall stays
high; nprobe and the re-ranking depth are raised until recall@10 on sampled queries reaches the target."""
from __future__ import annotations

import math
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clipforge.io.runs import write_files
from clipforge.runtime.threads import torch_matmul
from clipforge.search import store

KIND = "faiss IVF-PQ (inner product), re-ranked exactly"
PREFIX = "approximate-ivfpq-"  # the files of one build: PREFIX + token + .index / .ivfdata
PARTITION_ROWS = 1 << 20  # vectors whose inverted lists are built in RAM at once (72 MiB of codes and ids at PQ64)
CHUNK_ROWS = 1 << 16  # vectors widened to float32 at once (128 MiB at dimension 512)
TRAIN_PER_CELL = 50  # training vectors per k-means cell (faiss asks for at least 39)
MIN_TRAIN = 1 << 16  # and at least this many, for the PQ codebooks
FIRST_RERANK, MAX_RERANK = 10, 80  # candidates re-scored exactly, per result asked for
ID_BYTES = 8  # faiss keeps a 64-bit label beside each code
HEADER_BYTES = 4096  # what the files hold besides codes, ids, centroids, codebooks and the lists' table (< 1 KiB)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``512MB``, ``4GB``, ``1.5GiB``, ``4G`` or ``1000000``: K, M, G and T are powers of
    1024 with or without B or iB (as autofaiss reads them)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if found is None or (found.group(3) and found.group(3).lower() == "ib" and not found.group(2)):
        raise ValueError(f"{text!r} is not a size: write a number with a unit, such as 512MB, 4GB or 1.5GiB")
    size = int(float(found.group(1)) * _UNITS[found.group(2).lower()])
    if size <= 0:
        raise ValueError(f"a size must be more than 0 bytes, got {text!r}")
    return size


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Plan:
    """IVF-PQ parameters: k-means cells, PQ sub-quantisers and bits per sub-quantiser, training vectors."""

    cells: int
    m: int
    bits: int
    train: int

    @property
    def factory(self) -> str:
        return f"IVF{self.cells},PQ{self.m}x{self.bits}"

    @property
    def code_size(self) -> int:
        return (self.m * self.bits + 7) // 8

    def size(self, items: int, dim: int) -> int:
        """Bytes of the index: codes and ids of every vector, the cells' centroids, the PQ codebooks and the
        lists' table of contents (what a search may page in)."""
        return (items * (self.code_size + ID_BYTES) + self.cells * dim * 4 + (2 ** self.bits) * dim * 4
                + self.cells * 24 + HEADER_BYTES)


def plan(items: int, dim: int, max_bytes: int | None = None) -> Plan:
    """The parameters for ``items`` vectors of dimension ``dim`` within ``max_bytes``: about sqrt(items) cells
    (a power of two, at least 39 vectors each), 8-bit codes (fewer only below 256 vectors), and the longest code
    of dim/8 down to dim/64 sub-quantisers that fits. ValueError if even the shortest does not."""
    cells = 2 ** round(math.log2(math.sqrt(max(items, 1))))
    cells = max(1, min(cells, 2 ** int(math.log2(max(1, items // 39)))))
    bits = max(1, min(8, int(math.log2(max(items, 2)))))
    train = min(items, max(TRAIN_PER_CELL * cells, MIN_TRAIN))
    choices = [Plan(cells, m, bits, train) for m in _sub_quantisers(dim)]
    fitting = [p for p in choices if max_bytes is None or p.size(items, dim) <= max_bytes]
    if not fitting:
        smallest = choices[-1]
        raise ValueError(f"--max-index-memory {format_size(max_bytes)} cannot hold an IVF-PQ index of {items:,} "
                         f"vectors: the smallest ({smallest.factory}, {smallest.code_size + ID_BYTES} bytes a vector) "
                         f"needs {format_size(smallest.size(items, dim))}; allow at least that")
    return fitting[0]


def _sub_quantisers(dim: int) -> list[int]:
    """PQ sub-quantiser counts to try, longest code first: the divisors of ``dim`` from dim/8 down to dim/64
    (a byte of code for every 8 to 64 dimensions). Longer codes than dim/8 cost more to scan than re-ranking more
    candidates does."""
    found = [m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0 and m * 64 >= dim]
    return found or [1]


class Reranked:
    """An IVF-PQ index whose best ``rerank × k`` candidates by PQ score are re-scored exactly against the stored
    vectors (``read``: float32 vectors of segment rows; ``rows``: each label's segment row). ``search`` answers as
    a faiss index does: (scores, positions) (Q, k), position -1 past the end."""

    def __init__(self, index, read, rows: np.ndarray, rerank: int):
        self.index, self.read, self.rows, self.rerank = index, read, rows, rerank

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def nprobe(self) -> int:
        return self.index.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.index.nprobe = value

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        depth = max(k, min(self.ntotal, self.rerank * k))
        candidates = self.index.search(queries, depth)[1]  # (Q, depth), -1 past the end
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        for q, found in enumerate(candidates):
            found = found[found >= 0]
            exact = torch_matmul(self.read(self.rows[found]), queries[q])
            best = np.lexsort((found, -exact))[:k]  # ties by position, that is by id
            scores[q, :len(best)], positions[q, :len(best)] = exact[best], found[best]
        return scores, positions


class StoredVectors:
    """Reads stored vectors by segment row with ``os.preadv``, for re-ranking: a few hundred scattered rows a
    query, read without read-ahead (POSIX_FADV_RANDOM) and leaving nothing mapped, where a memory map would read
    128 KiB around each row and count every page touched as the process's resident memory. Rows the page cache
    holds are copied first, in the calling thread; the others are read by up to ``READERS`` threads at once: on
    disk (a collection larger than RAM) each is a random read, and a disk answers many at once about as fast as
    one. Thread-safe."""

    MAX_OPEN = 256  # segment files kept open, least recently used closed first (a billion vectors: 15,259)
    READERS = 16
    _pool = None  # the reading threads, shared by every instance, started on first use

    def __init__(self, folder: Path, dim: int, generation: int = 0):
        self.folder, self.dim, self.generation = folder, dim, generation
        self._open: dict[int, tuple[int, int]] = {}  # segment -> (descriptor, offset of row 0), least recent first
        self._busy: dict[int, int] = {}  # segment -> reads in flight, whose descriptor stays open
        self._lock = threading.Lock()
        self._nowait = hasattr(os, "RWF_NOWAIT")

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=np.float16)
        order = np.argsort(rows, kind="stable").tolist()
        numbers, withins = (part.tolist() for part in np.divmod(rows, store.SEGMENT_ROWS))
        used = sorted(set(numbers))
        with self._lock:
            files = {n: self._segment(n, used) for n in used}
            for n in used:
                self._busy[n] = self._busy.get(n, 0) + 1
        try:
            # the rows in the page cache, in this thread; the others from the disk, many at once
            missed = self._read(order, numbers, withins, files, out, cached_only=self._nowait)
            if missed:
                groups = [missed[i::self.READERS] for i in range(min(self.READERS, len(missed)))]
                list(self._readers().map(lambda group: self._read(group, numbers, withins, files, out), groups))
        finally:
            with self._lock:
                for n in used:
                    self._busy[n] -= 1
        return out.astype(np.float32)

    def _read(self, positions: list[int], numbers: list[int], withins: list[int], files: dict, out: np.ndarray,
              cached_only: bool = False) -> list[int]:
        """Read the rows at ``positions`` into ``out``; with ``cached_only``, only those the page cache holds
        whole (RWF_NOWAIT), returning the others."""
        size, missed = self.dim * 2, []
        for j in positions:
            fd, start = files[numbers[j]]
            try:
                got = os.preadv(fd, [out[j]], start + withins[j] * size, os.RWF_NOWAIT if cached_only else 0)
            except BlockingIOError:
                got = -1
            except OSError:  # a kernel or file system without RWF_NOWAIT: every read from the disk path
                if not cached_only:
                    raise
                self._nowait, got = False, -1
            if got != size:
                if not cached_only:
                    raise RuntimeError(f"segment {numbers[j]} of {self.folder} is shorter than its rows: the index "
                                       f"is damaged")
                missed.append(j)
        return missed

    @classmethod
    def _readers(cls):
        with _POOL_LOCK:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(cls.READERS, thread_name_prefix="clipforge-rerank")
            return cls._pool

    def _segment(self, number: int, keep: list[int]) -> tuple[int, int]:
        found = self._open.pop(number, None)
        if found is None:
            idle = [n for n in self._open if not self._busy.get(n) and n not in keep]
            for n in idle[:max(0, len(self._open) + 1 - self.MAX_OPEN)]:
                os.close(self._open.pop(n)[0])
            path = store.segment_path(self.folder, "images", number, self.generation)
            with open(path, "rb") as f:  # the .npy header's length
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                start = f.tell()
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            found = (fd, start)
        self._open[number] = found
        return found

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()

    def __del__(self) -> None:
        self.close()


_POOL_LOCK = threading.Lock()
# a forked child has none of its parent's threads: it starts its own pool when it first reads
os.register_at_fork(after_in_child=lambda: setattr(StoredVectors, "_pool", None))


def build(folder: Path, segments: list[np.ndarray], rows: np.ndarray, chosen: Plan, faiss, sample_queries,
          target: float, queries: int, progress: bool = True) -> dict:
    """Train, fill partition by partition, merge on disk and tune an IVF-PQ index over the vectors at segment
    ``rows`` (the items in id order; a vector's faiss label is its position there). Returns what config.json
    records (without the item and row counts)."""
    dim = segments[0].shape[1]
    token = uuid.uuid4().hex[:8]
    names = {"index": f"{PREFIX}{token}.index", "lists": f"{PREFIX}{token}.ivfdata"}
    work = folder / f"approximate-build-{token}"
    work.mkdir()
    clock, seconds = time.perf_counter(), {}

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

    try:
        trained = _train(faiss, segments, rows, chosen, dim)
        lap("train")
        parts = _fill(faiss, trained, segments, rows, work, progress)
        lap("lists")
        _merge(faiss, trained, parts, folder, names)
        lap("merge")
        searcher = Reranked(read(faiss, folder, names), lambda some: store.gather(segments, some), rows,
                            FIRST_RERANK)
        nprobe, rerank, recall = tune(searcher, segments, rows, chosen.cells, sample_queries, target, queries)
        lap("tune")
    except BaseException:
        for name in names.values():
            (folder / name).unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"kind": KIND, "factory": chosen.factory, "cells": chosen.cells, "pq_m": chosen.m, "pq_bits": chosen.bits,
            "train_vectors": chosen.train, "nprobe": nprobe, "rerank": rerank, "recall@10": round(recall, 4),
            "recall_queries": queries, "bytes": sum(os.path.getsize(folder / n) for n in names.values()),
            "files": names, "seconds": seconds}


def _train(faiss, segments, rows: np.ndarray, chosen: Plan, dim: int):
    """An empty IVF-PQ index trained on ``chosen.train`` vectors sampled without replacement (read in row order)."""
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(rows), size=chosen.train, replace=False))
    vectors = store.gather(segments, rows[sample])
    if len(vectors) < 2 ** chosen.bits:  # k-means needs a point per centroid: a tiny index repeats its vectors
        vectors = np.repeat(vectors, -(-2 ** chosen.bits // len(vectors)), axis=0)
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, chosen.cells, chosen.m, chosen.bits,
                             faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1  # small indexes: no warnings
    index.train(vectors)
    return index


def _fill(faiss, trained, segments, rows: np.ndarray, work: Path, progress: bool = True) -> list[Path]:
    """One faiss index file a partition of ``PARTITION_ROWS`` vectors, each filled ``CHUNK_ROWS`` at a time;
    labels are positions in ``rows``."""
    parts = []
    bar = tqdm(total=len(rows), unit="vectors", desc="IVF-PQ lists", disable=None if progress else True,
               dynamic_ncols=True)
    for first in range(0, len(rows), PARTITION_ROWS):
        part = faiss.clone_index(trained)
        for start in range(first, min(len(rows), first + PARTITION_ROWS), CHUNK_ROWS):
            end = min(len(rows), first + PARTITION_ROWS, start + CHUNK_ROWS)
            part.add_with_ids(store.gather(segments, rows[start:end]), np.arange(start, end, dtype=np.int64))
            bar.update(end - start)
        parts.append(work / f"part-{len(parts):05d}.index")
        faiss.write_index(part, str(parts[-1]))
        del part
    bar.close()
    return parts


def _merge(faiss, trained, parts: list[Path], folder: Path, names: dict) -> None:
    """Merge the partitions' inverted lists into one file (``names["lists"]``, faiss's on-disk layout: per cell,
    its codes then its ids) read through memory maps, never all in RAM, and write the index that points at it.
    Written here rather than by ``OnDiskInvertedLists.merge_from_multiple``, which prints to stdout."""
    loaded = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in parts]
    lists = [faiss.extract_index_ivf(index).invlists for index in loaded]
    cells, code_size = trained.nlist, trained.code_size
    sizes = np.array([[il.list_size(c) for c in range(cells)] for il in lists], dtype=np.uint64).reshape(-1, cells)

    def write_lists(path: Path) -> None:
        with open(path, "wb") as f:
            for c in range(cells):
                for il, size in zip(lists, sizes[:, c]):
                    if size:
                        f.write(faiss.rev_swig_ptr(il.get_codes(c), int(size) * code_size))
                for il, size in zip(lists, sizes[:, c]):
                    if size:
                        f.write(faiss.rev_swig_ptr(il.get_ids(c), int(size)))

    totals = sizes.sum(axis=0).astype(np.uint64)
    ondisk = faiss.OnDiskInvertedLists(cells, code_size, names["lists"])  # a name, not a path: the folder may move
    ondisk.set_all_lists_sizes(faiss.swig_ptr(totals))
    ondisk.totsize = int(totals.sum()) * (code_size + ID_BYTES)
    trained.replace_invlists(ondisk, True)
    ondisk.this.disown()
    trained.ntotal = int(totals.sum())
    write_files(folder, {names["lists"]: write_lists,
                         names["index"]: lambda path: faiss.write_index(trained, str(path))})


def read(faiss, folder: Path, names: dict):
    """The IVF-PQ index with its inverted lists memory-mapped read-only from ``names["lists"]`` in ``folder``, or
    None if the files are missing or do not match. (faiss's IO_FLAG_ONDISK_SAME_DIR would find the file too, but
    prints to stdout.)"""
    index_path, lists_path = folder / names["index"], folder / names["lists"]
    if not index_path.exists() or not lists_path.exists():
        return None
    index = faiss.read_index(str(index_path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    ondisk = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(ondisk, faiss.OnDiskInvertedLists) or os.path.getsize(lists_path) < ondisk.totsize:
        return None  # a short file would fault when a search touched its end
    ondisk.filename = str(lists_path)
    if ondisk.totsize:
        ondisk.do_mmap()
    return index


def tune(searcher: Reranked, segments, rows: np.ndarray, cells: int, sample_queries, target: float,
         count: int) -> tuple[int, int, float]:
    """(nprobe, re-ranking depth per result, recall@10): from nprobe 1 and depth ``FIRST_RERANK``, probe twice
    the cells while the probed cells miss more than half of what the target allows of the exact top 10, else
    re-rank twice as many candidates, until recall@10 after re-ranking reaches ``target``. Where doubling the
    cells reached it, the fewest cells between the two that still do are found by bisection, to within an
    eighth, and then the depth is halved while the target is still reached: a query's time grows with the cells
    it probes and the vectors it reads to re-rank."""
    queries = sample_queries(Live(segments, rows), count)
    truth = exact_top(segments, rows, queries, 10)
    quantizer = searcher.index.quantizer
    cell_of = quantizer.assign(store.gather(segments, rows[truth.ravel()]), 1).reshape(truth.shape)

    def recall_at(nprobe: int) -> float:
        searcher.nprobe = nprobe
        return recall_at_10(searcher.search(queries, 10)[1], truth)

    nprobe, short = 1, None  # short: the fewest cells known to miss the target at this depth
    while True:
        recall = recall_at(nprobe)
        if recall >= target or (nprobe >= cells and searcher.rerank >= MAX_RERANK):
            break
        probed = quantizer.search(queries, nprobe)[1]
        reached = np.mean([np.isin(cell_of[q], probed[q]).mean() for q in range(len(queries))])
        if nprobe < cells and (reached < (1 + target) / 2 or searcher.rerank >= MAX_RERANK):
            short, nprobe = nprobe, min(cells, nprobe * 2)
        else:
            short, searcher.rerank = None, searcher.rerank * 2
    if recall >= target and short is not None:
        nprobe, recall = fewest_probes(recall_at, short, nprobe, recall, target)
    while recall >= target and searcher.rerank > FIRST_RERANK:  # then re-rank as few as still reach it
        searcher.rerank //= 2
        found = recall_at(nprobe)
        if found < target:
            searcher.rerank *= 2
            break
        recall = found
    searcher.nprobe = nprobe
    return nprobe, searcher.rerank, recall


class Live:
    """The stored vectors of the items in id order, read on indexing (for ``sample_queries``)."""

    def __init__(self, segments: list[np.ndarray], rows: np.ndarray):
        self.segments, self.rows = segments, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions) -> np.ndarray:
        return store.gather(self.segments, self.rows[positions])


def exact_top(segments, rows: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions (Q, min(k, N)) of the exact top ``k`` of each query, best first, ties by position; read
    ``CHUNK_ROWS`` vectors at a time."""
    k = min(k, len(rows))
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    best = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(rows), CHUNK_ROWS):
        scores = queries @ store.gather(segments, rows[start:start + CHUNK_ROWS]).T  # (Q, C)
        take = min(k, scores.shape[1])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        best = np.concatenate([best, part + start], axis=1)
        order = np.lexsort((best, -best_scores), axis=1)[:, :k]
        best_scores, best = np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best, order, axis=1)
    return best


def fewest_probes(recall_at, short: int, enough: int, recall: float, target: float) -> tuple[int, float]:
    """(nprobe, its recall): the fewest cells between ``short`` (known to miss ``target``) and ``enough`` (known
    to reach it, with ``recall``) that still reach it, by bisection to within an eighth of ``enough``: doubling
    the cells overshoots by up to twice what a query needs, and a query's time grows with the cells it probes."""
    while enough - short > max(1, enough // 8):
        middle = (short + enough) // 2
        found = recall_at(middle)
        if found >= target:
            enough, recall = middle, found
        else:
            short = middle
    return enough, recall


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top 10 (``truth``, (Q, min(10, N))) among its ``found`` (Q, 10)."""
    return float(np.mean([len(set(t.tolist()) & set(f[:10].tolist())) / len(t) for t, f in zip(truth, found)]))


def describe(info: dict) -> str:
    """One line: what was chosen and what it measured."""
    limit = info.get("max_index_memory")
    code_size = (info["pq_m"] * info["pq_bits"] + 7) // 8
    return (f"approximate index: {info['factory']} ({info['items']:,} vectors, {code_size}-byte "
            f"codes), nprobe {info['nprobe']}, re-rank {info['rerank'] * 10} for the top 10 ({info['rerank']} x k): "
            f"recall@10 {info['recall@10']:.3f}, {format_size(info['bytes'])}"
            + (f" (--max-index-memory {format_size(limit)})" if limit else ""))
