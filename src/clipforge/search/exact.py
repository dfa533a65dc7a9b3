"""Exact top-k by cosine similarity over memory-mapped float16 vectors, chunk by chunk, in float32."""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from clipforge.runtime.threads import single_intraop_thread

CHUNK_ROWS = 4096  # a worker's float32 buffer (8 MiB at d = 512) stays in cache between widening and product


def scores(segments: list[np.ndarray], queries: np.ndarray) -> np.ndarray:
    """Cosine similarities (rows, Q) of every stored row to each L2-normalised query (Q, dim), float32.

    A float32 segment (a ``Float32Copies`` copy) is one product on torch's own threads. Float16 rows
    are widened chunk by chunk into a reused float32 buffer before the product, so the sums accumulate in
    float32; they are split into one contiguous range per torch thread, each scanned by its own worker
    with one intra-op thread: per-chunk operations are too small for torch's own threads, whose
    synchronisation at every operation costs more than the work (most when other processes hold cores).
    """
    placed, total = [], 0  # (rows, their first row in the output)
    for segment in segments:
        placed.append((segment, total))
        total += len(segment)
    out = np.empty((total, len(queries)), dtype=np.float32)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).T  # (dim, Q)
    narrow = [(rows, first) for rows, first in placed if rows.dtype != np.float32]
    for rows, first in placed:
        if rows.dtype == np.float32:
            torch.matmul(_as_tensor(rows), q, out=torch.from_numpy(out[first:first + len(rows)]))
    with single_intraop_thread() as threads:
        parts = _split(narrow, max(1, min(threads, sum(len(r) for r, _ in narrow) // CHUNK_ROWS)))
        if len(parts) == 1:
            _scan(parts[0], q, out)
        elif parts:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="clipforge-scan") as pool:
                list(pool.map(lambda part: _scan(part, q, out), parts))
    return out


def _split(placed: list[tuple[np.ndarray, int]], workers: int) -> list[list[tuple[np.ndarray, int]]]:
    """``placed`` (rows, their first row in the output) cut into ``workers`` lists of about equally many
    rows, in order, each a list of (rows, their first row in the output)."""
    total = sum(len(rows) for rows, _ in placed)
    bounds = [total * w // workers for w in range(workers + 1)]
    parts, start = [[] for _ in range(workers)], 0
    for rows, first in placed:
        for w in range(workers):
            lo, hi = max(bounds[w], start), min(bounds[w + 1], start + len(rows))
            if lo < hi:
                parts[w].append((rows[lo - start:hi - start], first + lo - start))
        start += len(rows)
    return [p for p in parts if p]


def _scan(part: list[tuple[np.ndarray, int]], q: torch.Tensor, out: np.ndarray) -> None:
    buffer = torch.empty((min(CHUNK_ROWS, sum(len(rows) for rows, _ in part)), q.shape[0]), dtype=torch.float32)
    for rows, first in part:
        for begin in range(0, len(rows), CHUNK_ROWS):
            block = buffer[:min(CHUNK_ROWS, len(rows) - begin)]  # (C, dim)
            block.copy_(_as_tensor(rows[begin:begin + len(block)]))
            target = torch.from_numpy(out[first + begin:first + begin + len(block)])
            torch.matmul(block, q, out=target)


def _as_tensor(rows: np.ndarray) -> torch.Tensor:
    """A tensor viewing (not copying) rows of a read-only memory map; it is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        return torch.from_numpy(np.asarray(rows))


class Float32Copies:
    """Float32 copies of float16 segments, held in RAM up to ``budget_mib``, first segments first.

    Scanning a float32 copy is one matrix product with no widening per chunk, for twice the segment's
    float16 size in memory; segments beyond the budget are widened chunk by chunk as before. Copies are
    kept by segment identity (file, inode, used rows), so a refresh after an update that appended rows
    copies only the segment that grew, and the files of a rebuilt index get new copies.
    """

    def __init__(self, budget_mib: float = 0):
        if budget_mib < 0:
            raise ValueError(f"the float32 vector budget must be at least 0 MiB, got {budget_mib}")
        self.budget = int(budget_mib * 2**20)
        self._copies: dict[str, dict[tuple, np.ndarray]] = {}  # kind -> identity -> copy

    def apply(self, kind: str, segments: list[np.ndarray], identities: list[tuple]) -> list[np.ndarray]:
        """``segments`` of ``kind`` with as many of the first as fit the budget replaced by float32 copies."""
        used = sum(c.nbytes for other, copies in self._copies.items() if other != kind for c in copies.values())
        previous, kept, out = self._copies.get(kind, {}), {}, []
        for segment, identity in zip(segments, identities):
            size = segment.shape[0] * segment.shape[1] * 4
            if used + size > self.budget:
                out.append(segment)
                continue
            copy = previous[identity] if identity in previous else _as_tensor(segment).float().numpy()
            kept[identity], used = copy, used + size
            out.append(copy)
        self._copies[kind] = kept
        return out

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for copies in self._copies.values() for c in copies.values())


def top_k(candidate_scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of the ``k`` best of ``candidate_scores`` (N,), best first; ties by position."""
    k = min(k, len(candidate_scores))
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    if k < len(candidate_scores):
        part = np.argpartition(-candidate_scores, k - 1)[:k]
    else:
        part = np.arange(len(candidate_scores))
    order = np.lexsort((part, -candidate_scores[part]))
    best = part[order]
    return best, candidate_scores[best]
