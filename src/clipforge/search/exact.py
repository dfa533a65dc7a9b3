"""Exact top-k by cosine similarity over memory-mapped float16 vectors, chunk by chunk, in float32."""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..threads import single_intraop_thread

CHUNK_ROWS = 4096  # a worker's float32 buffer (8 MiB at d = 512) stays in cache between widening and product


def scores(segments: list[np.ndarray], queries: np.ndarray) -> np.ndarray:
    """Cosine similarities (rows, Q) of every stored row to each L2-normalised query (Q, dim), float32.

    Each chunk of float16 rows is widened into a reused float32 buffer before the product, so the sums
    accumulate in float32. The rows are split into one contiguous range per torch thread, each scanned by
    its own worker with one intra-op thread: per-chunk operations are too small for torch's own threads,
    whose synchronisation at every operation costs more than the work (most when other processes hold cores).
    """
    total = sum(len(s) for s in segments)
    out = np.empty((total, len(queries)), dtype=np.float32)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).T  # (dim, Q)
    with single_intraop_thread() as threads:
        parts = _split(segments, total, max(1, min(threads, total // CHUNK_ROWS)))
        if len(parts) == 1:
            _scan(parts[0], q, out)
        else:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="clipforge-scan") as pool:
                list(pool.map(lambda part: _scan(part, q, out), parts))
    return out


def _split(segments: list[np.ndarray], total: int, workers: int) -> list[list[tuple[np.ndarray, int]]]:
    """``workers`` lists of (rows of a segment, their first row in the output), about equally long."""
    bounds = [total * w // workers for w in range(workers + 1)]
    parts, start = [[] for _ in range(workers)], 0
    for segment in segments:
        for w in range(workers):
            lo, hi = max(bounds[w], start), min(bounds[w + 1], start + len(segment))
            if lo < hi:
                parts[w].append((segment[lo - start:hi - start], lo))
        start += len(segment)
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
