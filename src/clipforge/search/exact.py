"""Exact top-k by cosine similarity over memory-mapped float16 vectors, chunk by chunk, in float32."""
from __future__ import annotations

import warnings

import numpy as np
import torch

CHUNK_ROWS = 32768


def scores(segments: list[np.ndarray], queries: np.ndarray) -> np.ndarray:
    """Cosine similarities (rows, Q) of every stored row to each L2-normalised query (Q, dim), float32.

    Each chunk of float16 rows is widened into one reused float32 buffer before the product, so the sums
    accumulate in float32.
    """
    total = sum(len(s) for s in segments)
    out = np.empty((total, len(queries)), dtype=np.float32)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).T  # (dim, Q)
    buffer = torch.empty((min(CHUNK_ROWS, max(total, 1)), q.shape[0]), dtype=torch.float32)
    start = 0
    for segment in segments:
        for begin in range(0, len(segment), CHUNK_ROWS):
            block = buffer[:min(CHUNK_ROWS, len(segment) - begin)]  # (C, dim)
            block.copy_(_as_tensor(segment[begin:begin + CHUNK_ROWS]))
            torch.matmul(block, q, out=torch.from_numpy(out[start:start + len(block)]))
            start += len(block)
    return out


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
