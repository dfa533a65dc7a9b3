"""Duplicate photos across an index: groups of exact copies (the same content hash) and of near-duplicates (image
vectors at cosine ``threshold`` or more: re-encoded, resized, lightly cropped or edited copies), found from the
stored vectors alone, never re-encoding, with a suggested keeper per group. It reads the index and reports; it
never deletes, moves or writes a file.

Grouping is by connected components of the graph whose edges join two items at cosine ``threshold`` or more, or
with the same content hash. Components, rather than a clustering that needs an order or a number of clusters,
are order-independent (the same index gives the same groups, on either store, exactly or approximately
searched) and keep every copy of a photo in one group even when two copies are close only through a third (a
crop of a resize); the price is chaining, where a series of similar shots joins one group although its first
and last differ more. At the near-duplicate thresholds this is measured for (docs/search.md, "Duplicates")
chaining is rare, and each member carries its cosine to the keeper so that a reader sees how close it is.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.94  # chosen on planted near-duplicates of real photos (bench/bench_duplicates.py)
EXACT_COSINE = 0.99  # identical files have identical stored vectors: always at least this, float16 rounding aside
APPROXIMATE_ABOVE = 20_000  # items above which approximate=None compares items within cells only
PROBES = 8  # approximate: the cells each item is compared with (its nearest)
READ_CHUNK = 65_536  # vectors read from the store per call
BLOCK = 2_048  # exact: rows compared with every later row at a time
TILE = (2_048, 16_384)  # rows x columns of one matrix product: 128 MiB of float32 cosines
PAIRS_PER_ITEM, MIN_PAIR_LIMIT = 100, 1_000_000  # more pairs than the larger limit: a threshold far too low


@dataclass(frozen=True)
class DuplicateMember:
    """One file of a group: the item's id, path (``shard.tar:key`` inside a shard), file size in bytes, pixel
    size, capture time (ISO 8601: EXIF, else the file's mtime, as ``captured_from`` says), content hash, cosine
    of its vector to the keeper's, and whether its bytes are the keeper's (``exact``)."""

    id: int
    path: str
    size: int
    width: int
    height: int
    captured: str | None
    captured_from: str | None
    hash: str
    similarity: float
    exact: bool

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DuplicateGroup:
    """Files that are copies of one photo; ``members[0]`` is the suggested keeper (the most pixels, then the
    oldest capture, then the largest file, then the lowest id), the others follow, most similar first."""

    members: tuple[DuplicateMember, ...]

    @property
    def keeper(self) -> DuplicateMember:
        return self.members[0]

    @property
    def kind(self) -> str:
        """"exact" when every member has the keeper's bytes, else "near"."""
        return "exact" if all(m.exact for m in self.members) else "near"

    @property
    def redundant_bytes(self) -> int:
        """The bytes of the members other than the keeper."""
        return sum(m.size for m in self.members[1:])

    def to_dict(self) -> dict:
        """The group as JSON-ready data: kind, keeper id, redundant bytes and the members (keeper first)."""
        return {"kind": self.kind, "keeper": self.keeper.id, "redundant_bytes": self.redundant_bytes,
                "members": [asdict(m) for m in self.members]}


def find_duplicates(index, threshold: float = DEFAULT_THRESHOLD,
                    approximate: bool | None = None) -> list[DuplicateGroup]:
    """The groups of duplicate images in ``index`` (a ``clipforge.search.Index`` of either store), those with
    the most redundant bytes first. Two items are duplicates when they have the same content hash or their
    stored image vectors have cosine ``threshold`` or more; a group is a connected component of that relation
    (see the module's docstring). Pairs are found exactly (every pair, in blocks), or with ``approximate`` (True;
    None: above ``APPROXIMATE_ABOVE`` items) within the cells of an inverted file, each item compared with the
    items of its ``PROBES`` nearest cells (the bench measures its recall of the exact pairs). Reads the vectors
    once (float32: 4 x dim bytes per item) and the metadata of the items in pairs; writes nothing."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity above 0 and at most 1, got {threshold}")
    ids = np.asarray(index.ids(), dtype=np.int64)
    if len(ids) < 2:
        return []
    vectors = _read_vectors(index, ids)
    floor = min(threshold, EXACT_COSINE)  # pairs at floor or above are candidates; identical files among them
    first, second, scores = near_pairs(vectors, floor, _approximate(approximate, len(ids)))
    candidates = np.unique(np.concatenate([first, second]))
    items = {int(p): index.item(int(ids[p])) for p in candidates}
    joined = (scores >= threshold) | np.array([items[int(i)].hash == items[int(j)].hash
                                              for i, j in zip(first, second)], dtype=bool)
    # a video's frames are moments of one file, not copies to delete: they join no group
    joined &= np.array([items[int(i)].time is None and items[int(j)].time is None for i, j in zip(first, second)],
                       dtype=bool)
    components = _components(first[joined], second[joined])
    groups = [_group(positions, items, vectors) for positions in components]
    return sorted(groups, key=lambda g: (-g.redundant_bytes, g.keeper.id))


def _read_vectors(index, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of ``ids`` as float32 (N, dim), renormalised: float16 storage leaves norms within
    about 1e-3 of one, and renormalised, a product is the cosine itself."""
    vectors = np.empty((len(ids), index.dim), dtype=np.float32)
    for start in range(0, len(ids), READ_CHUNK):
        vectors[start:start + READ_CHUNK] = index.vectors(ids[start:start + READ_CHUNK])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def near_pairs(vectors: np.ndarray, floor: float, approximate: bool = False) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray]:
    """(first, second, cosine): the pairs of rows i < j of the unit ``vectors`` (N, dim) float32 at cosine
    ``floor`` or more, ordered: every one, or (``approximate``) those whose rows meet in an inverted file's
    cells."""
    limit = max(MIN_PAIR_LIMIT, PAIRS_PER_ITEM * len(vectors))
    return _approximate_pairs(vectors, floor, limit) if approximate else _exact_pairs(vectors, floor, limit)


def _approximate(approximate: bool | None, count: int) -> bool:
    return approximate if approximate is not None else count > APPROXIMATE_ABOVE


def _exact_pairs(vectors: np.ndarray, floor: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows at cosine ``floor`` or more: each block of ``BLOCK`` rows against itself and the rows
    after it."""
    found, count = _Pairs(floor, limit), len(vectors)
    for start in range(0, count, BLOCK):
        found.add(vectors, np.arange(start, min(start + BLOCK, count)), np.arange(start, count))
    return found.unique()


def _approximate_pairs(vectors: np.ndarray, floor: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs at cosine ``floor`` or more whose rows share a cell of an inverted file: spherical k-means
    cells (about sqrt(N)), each row kept in its nearest cell and compared with the rows of its ``PROBES``
    nearest cells, by matrix products. This is faiss's IVF search run as a batch: a self-join of every item
    compares whole cells at once, which BLAS does several times faster than scanning lists query by query."""
    count = len(vectors)
    centroids = _kmeans(vectors, max(1, int(np.sqrt(count))))
    probes = min(PROBES, len(centroids))
    nearest = np.empty((count, probes), dtype=np.int64)  # nearest cells, the nearest first
    for start in range(0, count, READ_CHUNK):
        products = vectors[start:start + READ_CHUNK] @ centroids.T
        top = np.argpartition(-products, probes - 1, axis=1)[:, :probes]
        order = np.argsort(-np.take_along_axis(products, top, axis=1), axis=1)
        nearest[start:start + READ_CHUNK] = np.take_along_axis(top, order, axis=1)
    members = _by_cell(np.arange(count), nearest[:, 0], len(centroids))
    probing = _by_cell(np.repeat(np.arange(count), probes), nearest.ravel(), len(centroids))
    found = _Pairs(floor, limit)
    for inside, asking in zip(members, probing):
        found.add(vectors, asking, inside)
    return found.unique()


class _Pairs:
    """Pairs of rows at cosine ``floor`` or more, gathered tile by tile; a ValueError once there are more than
    ``limit``: at such a cosine most photos are "duplicates" of many others, and the pairs would fill the memory."""

    def __init__(self, floor: float, limit: int):
        self.floor, self.limit, self.count = floor, limit, 0
        self.first: list[np.ndarray] = []
        self.second: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []

    def add(self, vectors: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> None:
        """The pairs of distinct ``rows`` x ``columns`` as (smaller, larger) row, one ``TILE`` of products at a
        time (bounded memory however large a cell or the index is)."""
        for r in range(0, len(rows), TILE[0]):
            left = vectors[rows[r:r + TILE[0]]]
            for c in range(0, len(columns), TILE[1]):
                products = left @ vectors[columns[c:c + TILE[1]]].T  # (rows, columns) of this tile
                i, j = np.nonzero(products >= self.floor)
                a, b = rows[r + i], columns[c + j]
                distinct = a != b
                self.first.append(np.minimum(a, b)[distinct])
                self.second.append(np.maximum(a, b)[distinct])
                self.scores.append(products[i, j][distinct])
                self.count += int(distinct.sum())
                if self.count > self.limit:
                    raise ValueError(f"more than {self.limit:,} pairs of items have cosine {self.floor} or more: "
                                     "that joins unrelated photos, not duplicates; raise the threshold (copies of "
                                     "one photo are usually above 0.9)")

    def unique(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first, second, cosine), each pair once, ordered by (first, second)."""
        if not self.first:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        first, second = np.concatenate(self.first), np.concatenate(self.second)
        _, unique = np.unique(first * (int(second.max(initial=0)) + 1) + second, return_index=True)
        return first[unique], second[unique], np.concatenate(self.scores)[unique]


def _kmeans(vectors: np.ndarray, cells: int, iterations: int = 10) -> np.ndarray:
    """``cells`` unit centroids of spherical k-means on a sample of at most 40 rows a cell (seeded: the same
    index gives the same cells); a cell left empty takes a random sample row."""
    rng = np.random.default_rng(0)
    sample = vectors[np.sort(rng.choice(len(vectors), size=min(len(vectors), 40 * cells), replace=False))]
    centroids = sample[rng.choice(len(sample), size=cells, replace=False)].copy()
    for _ in range(iterations):
        assigned = np.argmax(sample @ centroids.T, axis=1)
        order = np.argsort(assigned, kind="stable")
        used, starts = np.unique(assigned[order], return_index=True)
        sums = sample[rng.choice(len(sample), size=cells)]  # what an empty cell takes
        sums[used] = np.add.reduceat(sample[order], starts, axis=0)
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids


def _by_cell(rows: np.ndarray, cells: np.ndarray, count: int) -> list[np.ndarray]:
    """``rows`` split by their ``cells`` (a list of ``count`` arrays)."""
    order = np.argsort(cells, kind="stable")
    return np.split(rows[order], np.cumsum(np.bincount(cells, minlength=count))[:-1])


def _components(first: np.ndarray, second: np.ndarray) -> list[list[int]]:
    """The connected components of the graph with edges (first[k], second[k]), each of two or more nodes,
    as sorted lists (union-find with path halving)."""
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in zip(first.tolist(), second.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for node in sorted(parent):
        members.setdefault(root(node), []).append(node)
    return list(members.values())


def _group(positions: list[int], items: dict, vectors: np.ndarray) -> DuplicateGroup:
    keeper = min(positions, key=lambda p: _keeper_rank(items[p]))
    similarity = vectors[positions] @ vectors[keeper]
    members = [DuplicateMember(int(items[p].id), items[p].location, int(items[p].size), int(items[p].width),
                               int(items[p].height), items[p].captured, items[p].captured_from, items[p].hash,
                               1.0 if p == keeper else round(float(s), 4), items[p].hash == items[keeper].hash)
               for p, s in zip(positions, similarity)]
    members.sort(key=lambda m: (m.id != items[keeper].id, -m.similarity, m.id))
    return DuplicateGroup(tuple(members))


def _keeper_rank(item) -> tuple:
    """Smaller is a better keeper: the most pixels, then the oldest capture (the local time where the photo was
    taken; an item without one last), then the largest file, then the lowest id."""
    captured = (item.captured or "")[:19]
    return -item.width * item.height, (captured == "", captured), -item.size, item.id
