"""Exact top-k by cosine similarity over memory-mapped float16 vectors, chunk by chunk, in float32; and, for
collections held in RAM, an int8 screen that finds the few rows that can be in the top k, which are then scored
exactly."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from clipforge.models.quantize import input_levels, pack_rows, quantize_rows
from clipforge.runtime.threads import read_only_tensor, single_intraop_thread, torch_matmul
from clipforge.search import store

CHUNK_ROWS = 4096  # a worker's float32 buffer (8 MiB at d = 512) stays in cache between widening and product
SCREEN_MIN_ROWS = 32768  # below this a float32 scan takes a millisecond or two: screening gains nothing
SCREEN_MAX_SHARE = 0.25  # more candidates than this share of the rows: scan them all instead


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
            torch.matmul(read_only_tensor(rows), q, out=torch.from_numpy(out[first:first + len(rows)]))
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
            block.copy_(read_only_tensor(rows[begin:begin + len(block)]))
            target = torch.from_numpy(out[first + begin:first + begin + len(block)])
            torch.matmul(block, q, out=target)


class Int8Screen:
    """One segment's rows as int8 with a scale per row, packed for PyTorch's dynamically quantised product
    (``clipforge.models.quantize.pack_rows``): a quarter of a float32 copy's bytes to read per query, and with
    each row's approximate score a bound on its error, so that the rows that can be in the top k are known for
    certain (``screened_top``).

    The product computes ``q̂ · v̂`` exactly in integers, with ``v̂`` the int8 row and ``q̂`` the query
    quantised from its own range. By Cauchy-Schwarz, for a unit query ``q``,
    ``|q·v - q̂·v̂| <= ||v - v̂|| + ||q - q̂|| ||v̂||``: the first norm is kept per row (``slack``), ``||v̂||`` too
    (``norms``), and ``||q - q̂||`` is at most half a quantisation step per element.
    """

    def __init__(self, rows: np.ndarray):
        vectors = read_only_tensor(rows).float()
        values, scales = quantize_rows(vectors)
        approximate = values.float() * scales[:, None]
        # with a margin for the float rounding of the kernel's scales and of these norms
        self.slack = torch.linalg.vector_norm(vectors - approximate, dim=1) * (1 + 1e-4) + 1e-5  # (N,)
        self.norms = torch.linalg.vector_norm(approximate, dim=1) * (1 + 1e-4)  # (N,)
        self.packed, self.reduce_range = pack_rows(values, scales, torch.zeros(len(values)))
        self.dim = vectors.shape[1]
        self.nbytes = values.numel() + 8 * len(values)  # the packed int8 rows and the two norms per row

    def __len__(self) -> int:
        return len(self.slack)

    def scores(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(approximate scores (N,), bounds (N,)) for a unit query (1, dim) float32: each row's exact score
        is within its bound of its approximate one."""
        approximate = torch.ops.quantized.linear_dynamic(query, self.packed, self.reduce_range)[0]
        step = (max(float(query.max()), 0.0) - min(float(query.min()), 0.0)) / input_levels(self.reduce_range)
        query_error = 0.5 * step * math.sqrt(self.dim)
        return approximate, torch.addcmul(self.slack, self.norms, torch.tensor(query_error))


def screened_top(screens: list[Int8Screen], segments: list[np.ndarray], rows: np.ndarray, query: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``top_k`` of the exact scores of ``rows`` (indices into the concatenated segments) for the unit
    ``query`` (dim,), computed from the rows that the int8 ``screens`` (one per segment) cannot rule out; None
    where they rule out too few (over ``SCREEN_MAX_SHARE`` of the rows remain): scan those rows instead.

    A row is ruled out when even its upper bound is below the k-th best lower bound: k rows score at least
    that, so it cannot be among the k best. The rest are scored exactly from the stored float16 rows; positions
    refer to ``rows`` and ties go by position, as ``top_k`` over a full scan gives them."""
    k = min(k, len(rows))
    if k <= 0:
        return None
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))[None]
    approximate, bound = (torch.cat(parts).numpy() for parts in zip(*(s.scores(q) for s in screens)))
    if len(rows) != len(approximate) or not np.array_equal(rows, np.arange(len(rows))):  # not every row in order
        approximate, bound = approximate[rows], bound[rows]
    lower = approximate - bound
    threshold = np.partition(lower, len(lower) - k)[len(lower) - k]  # the k-th largest lower bound
    candidates = np.flatnonzero(approximate + bound >= threshold)
    if len(candidates) > SCREEN_MAX_SHARE * len(rows):
        return None
    exact_scores = rows_scores(segments, rows[candidates], query)
    positions, best = top_k(exact_scores, k)
    return candidates[positions], best


def rows_scores(segments: list[np.ndarray], rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Exact scores (float32) of the given rows (``clipforge.search.store.gather``'s) for the unit ``query``
    (dim,). The sums are in float64: a float32 product's rounding depends on where a row falls in the BLAS
    kernel's blocks, and equal rows must score alike so that ties go by position."""
    gathered = store.gather(segments, rows).astype(np.float64)  # float16 values, exact in both widenings
    return torch_matmul(gathered, query).astype(np.float32)


class Float32Copies:
    """Copies of float16 segments held in RAM, within one budget of ``budget_mib``, first segments first:
    float32 copies (``apply``), and int8 screens (``screens``) for collections of ``SCREEN_MIN_ROWS`` or more.

    Scanning a float32 copy is one matrix product with no widening per chunk, for twice the segment's
    float16 size in memory; segments beyond the budget are widened chunk by chunk as before. A screen takes
    half the float16 size. Copies are kept by segment identity (file, inode, used rows), so a refresh after an
    update that appended rows copies only the segment that grew, and the files of a rebuilt index get new copies.
    """

    def __init__(self, budget_mib: float = 0):
        if budget_mib < 0:
            raise ValueError(f"the float32 vector budget must be at least 0 MiB, got {budget_mib}")
        self.budget = int(budget_mib * 2**20)
        self._copies: dict[tuple[str, str], dict[tuple, np.ndarray | Int8Screen]] = {}  # (form, kind) -> copies

    def apply(self, kind: str, segments: list[np.ndarray], identities: list[tuple]) -> list[np.ndarray]:
        """``segments`` of ``kind`` with as many of the first as fit the budget replaced by float32 copies."""
        key = ("float32", kind)
        used, previous, kept, out = self._used(key), self._copies.get(key, {}), {}, []
        for segment, identity in zip(segments, identities):
            size = segment.shape[0] * segment.shape[1] * 4
            if used + size > self.budget:
                out.append(segment)
                continue
            copy = previous[identity] if identity in previous else read_only_tensor(segment).float().numpy()
            kept[identity], used = copy, used + size
            out.append(copy)
        self._copies[key] = kept
        return out

    def screens(self, kind: str, segments: list[np.ndarray], identities: list[tuple]) -> list[Int8Screen] | None:
        """An int8 screen of each of ``segments``, where the rows are at least ``SCREEN_MIN_ROWS`` and all the
        screens fit the budget beside the other copies; else None."""
        key = ("int8", kind)
        size = sum(s.shape[0] * (s.shape[1] + 8) for s in segments)
        if sum(len(s) for s in segments) < SCREEN_MIN_ROWS or self._used(key) + size > self.budget:
            self._copies.pop(key, None)
            return None
        previous = self._copies.get(key, {})
        kept = {identity: previous[identity] if identity in previous else Int8Screen(segment)
                for segment, identity in zip(segments, identities)}
        self._copies[key] = kept
        return [kept[identity] for identity in identities]

    def _used(self, key: tuple[str, str]) -> int:
        """The bytes of every copy but those of ``key``."""
        return sum(c.nbytes for other, copies in self._copies.items() if other != key for c in copies.values())

    @property
    def nbytes(self) -> int:
        """The float32 copies' bytes."""
        return sum(c.nbytes for (form, _), copies in self._copies.items() if form == "float32" for c in copies.values())

    @property
    def screen_nbytes(self) -> int:
        """The int8 screens' bytes."""
        return sum(c.nbytes for (form, _), copies in self._copies.items() if form == "int8" for c in copies.values())


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
