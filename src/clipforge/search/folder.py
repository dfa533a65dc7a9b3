"""The folder store read side: an index folder's committed items, their memory-mapped float16 vectors, exact
search over them (``clipforge.search.exact``) and the faiss index beside them when it is current."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from clipforge.search import exact, store
from clipforge.search.approximate import is_current
from clipforge.search.approximate import load as load_approximate
from clipforge.search.approximate import search as search_approximate
from clipforge.search.records import Filters, Item


class _CaptureTimes:
    """Item id -> capture time, read from the database on first use: a store that never orders by date does not
    hold it (over a gigabyte at ten million items)."""

    def __init__(self, db, lock, dated: bool):
        self._db, self._lock, self._dated, self._times = db, lock, dated, None

    def get(self, id: int, default=None):
        if self._times is None:
            with self._lock:
                found = self._db.execute("SELECT id, captured FROM items").fetchall() if self._dated else []
                self._times = dict((r[0], r[1]) for r in found)
        return self._times.get(id, default)


class FolderStore:
    """An index folder, opened read-only. Exact search keeps float32 copies of up to ``float32_mib`` MiB of
    the vectors in RAM (``clipforge.search.exact.Float32Copies``)."""

    kind = "folder"

    def __init__(self, folder: str | os.PathLike, float32_mib: float = 0, nprobe: int | None = None):
        self.folder = Path(folder)
        self._nprobe = nprobe  # the approximate index's cells probed per query (None: as its build tuned)
        self.location = str(folder)
        config = store.read_config(self.folder)
        if config is None or not (self.folder / store.DATABASE).exists():
            raise FileNotFoundError(f"no search index in {self.folder} (no {store.CONFIG}); build one with "
                                    f"`clipforge index SOURCE... --model MODEL --index {self.folder}`")
        self.config = config
        self._lock = threading.RLock()
        self._copies = exact.Float32Copies(float32_mib)
        self._db = store.connect(self.folder, readonly=True)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the committed rows (after another process updated the index), from one snapshot of the
        database; files a compaction removed meanwhile make it read again."""
        with self._lock:
            for attempt in range(3):
                # before the snapshot: a commit between the two makes one refresh too many, never one too few
                self._version = self._db.execute("PRAGMA data_version").fetchone()[0]
                self._db.execute("BEGIN")  # one read transaction: the rows, their generation and counts agree
                try:
                    self._read()
                    return
                except FileNotFoundError:
                    if attempt == 2:
                        raise
                finally:
                    self._db.execute("END")

    def _current(self) -> None:
        """Refresh first if another connection committed since (a running indexer or compaction): SQLite's
        data_version changes then, so a service shows new items without a restart."""
        with self._lock:
            if self._db.execute("PRAGMA data_version").fetchone()[0] != self._version:
                self.refresh()

    def _read(self) -> None:
        self._dated = store.has_capture_times(self._db)
        self._captured = _CaptureTimes(self._db, self._lock, self._dated)
        found = store.int_columns(self._db, "SELECT id, row, coalesce(caption_row, -1) FROM items ORDER BY id")
        self._ids, self._rows = np.ascontiguousarray(found[:, 0]), np.ascontiguousarray(found[:, 1])
        with_caption = found[found[:, 2] >= 0]
        self._caption_ids, self._caption_rows = with_caption[:, 0].copy(), with_caption[:, 2].copy()
        generation = store.current_generation(self._db)
        opened = {kind: store.open_identified_segments(self.folder, kind, store.next_row(self._db, kind),
                                                       generation)
                  for kind in store.KINDS}
        self._segments = {kind: [segment for segment, _ in pairs] for kind, pairs in opened.items()}
        self._identities = {kind: [identity for _, identity in pairs] for kind, pairs in opened.items()}
        self._scanned: dict[str, list[np.ndarray]] = {}  # kind -> segments as exact search reads them
        self.config = store.read_config(self.folder)
        info = self.config.get("approximate")
        current = is_current(info, len(self._ids), store.next_row(self._db, "images"))
        self._approximate = load_approximate(self.folder, info, self._ids, self._rows, generation) if current else None
        if self._approximate is not None and self._nprobe is not None:
            self._approximate[0].nprobe = self._nprobe

    def __len__(self) -> int:
        self._current()
        return len(self._ids)

    def ids(self, captions: bool = False) -> np.ndarray:
        self._current()
        return (self._caption_ids if captions else self._ids).copy()

    def vectors(self, ids, captions: bool = False) -> np.ndarray:
        """The stored vectors of ``ids`` as float32 (N, dim); KeyError for an id without one."""
        known, rows = (self._caption_ids, self._caption_rows) if captions else (self._ids, self._rows)
        ids = np.asarray(ids, dtype=np.int64)
        where = np.searchsorted(known, ids)
        found = (where < len(known)) & (known[np.minimum(where, len(known) - 1)] == ids) if len(known) else \
            np.zeros(len(ids), dtype=bool)
        if not found.all():
            raise KeyError(f"no {'caption ' if captions else ''}vector for item {int(ids[~found][0])} in this index")
        if not len(ids):
            return np.empty((0, int(self.config["dim"])), dtype=np.float32)
        return store.gather(self._segments["captions" if captions else "images"], rows[where])

    def ranked(self, vector: np.ndarray, limit: int, filters: Filters = Filters(), captions: bool = False,
               min_score: float | None = None, approximate: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the best ``limit`` items for the unit ``vector``, best first; ties by id."""
        self._current()
        if self._wants_approximate(approximate, filters, captions):
            ids, found = self._approximate_top(vector[None], limit)
            keep = (ids[0] >= 0) & (found[0] >= (min_score if min_score is not None else -np.inf))
            return ids[0][keep], found[0][keep]
        ids, positions, best = self._exact_top(vector, limit, filters, captions)
        if min_score is not None:
            positions, best = positions[best >= min_score], best[best >= min_score]
        return ids[positions], best

    def by_date(self, vector: np.ndarray, limit: int, filters: Filters = Filters(), captions: bool = False,
                min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the first ``limit`` items at or above ``min_score``, newest capture first (ties
        by score, then id)."""
        self._current()
        self._need_dates()
        ids, scores = self._scored(vector, filters, captions)
        keep = scores >= min_score if min_score is not None else np.ones(len(ids), dtype=bool)
        ids, scores = ids[keep], scores[keep]
        order = sorted(range(len(ids)), key=lambda j: ((self._captured.get(int(ids[j])) or "")[:19],
                                                       float(scores[j]), -int(ids[j])), reverse=True)[:limit]
        return ids[order], scores[order]

    def _exact_top(self, vector: np.ndarray, limit: int, filters: Filters,
                   captions: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids of the items ``filters`` keeps, positions of the best ``limit`` among them, their exact
        scores): through the int8 screens where the vectors have them in RAM, else by scanning every row."""
        kind = "captions" if captions else "images"
        ids, rows = self._kept(filters, captions)
        with self._lock:
            screens = self._copies.screens(kind, self._segments[kind], self._identities[kind])
        found = exact.screened_top(screens, self._segments[kind], rows, vector, limit) if screens else None
        if found is None:
            found = exact.top_k(self._scan_scores(kind, rows, vector), limit)
        return ids, *found

    def _scored(self, vector: np.ndarray, filters: Filters, captions: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids, exact scores) of every item ``filters`` keeps."""
        kind = "captions" if captions else "images"
        ids, rows = self._kept(filters, captions)
        return ids, self._scan_scores(kind, rows, vector)

    def _scan_scores(self, kind: str, rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """Exact scores of ``rows`` of ``kind``, from a scan of every row."""
        return exact.scores(self._scan_segments(kind), vector[None])[rows, 0] if len(rows) else np.empty(0)

    def _kept(self, filters: Filters, captions: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every item ``filters`` keeps, by id."""
        ids, rows = (self._caption_ids, self._caption_rows) if captions else (self._ids, self._rows)
        if filters:
            keep = np.isin(ids, self._ids_matching(filters))
            ids, rows = ids[keep], rows[keep]
        return ids, rows

    def _need_dates(self) -> None:
        if not self._dated:
            raise ValueError(f"the index in {self.folder} predates capture dates: run `clipforge index` on it once "
                             f"to add them (nothing is encoded again)")

    def search_batch(self, queries: np.ndarray, top_k: int, approximate: bool = False):
        self._current()
        if approximate:
            return self._approximate_top(queries, top_k)
        all_scores = exact.scores(self._scan_segments("images"), queries)[self._rows]  # (N, Q)
        best = [exact.top_k(all_scores[:, q], top_k) for q in range(len(queries))]
        return np.stack([self._ids[p] for p, _ in best]), np.stack([s for _, s in best])

    def _scan_segments(self, kind: str) -> list[np.ndarray]:
        """The segments of ``kind``, those within the float32 budget as their float32 copies."""
        with self._lock:
            if kind not in self._scanned:
                self._scanned[kind] = self._copies.apply(kind, self._segments[kind], self._identities[kind])
            return self._scanned[kind]

    def _wants_approximate(self, approximate: bool | None, filters: Filters, captions: bool) -> bool:
        if approximate is False:
            return False
        usable = self._approximate is not None and not filters and not captions
        if approximate and not usable:
            raise ValueError("no approximate search here: the index has no current approximate index (build one "
                             "with `clipforge index ... --approximate always`), or a filter, dedup or captions "
                             "was given")
        return usable

    def _approximate_top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._approximate is None:
            raise ValueError("this index has no current approximate index; build it with --approximate always")
        searcher, ids = self._approximate
        found, positions = search_approximate(searcher, queries, k)
        return np.where(positions < 0, -1, ids[np.maximum(positions, 0)]), found  # -1: fewer than k found

    def _ids_matching(self, filters: Filters) -> np.ndarray:
        if filters.after is not None or filters.before is not None:
            self._need_dates()
        conditions, params = filters.sql("sqlite")
        with self._lock:
            found = self._db.execute(f"SELECT id FROM items WHERE {' AND '.join(conditions)}", params).fetchall()
        return np.array([r[0] for r in found], dtype=np.int64)

    def items(self, ids: list[int]) -> list[Item]:
        if not ids:
            return []
        columns = [c if self._dated or not c.startswith("captured") else "NULL" for c in store.ITEM_COLUMNS]
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(columns)} FROM items WHERE id IN "
                                    f"({', '.join('?' * len(ids))})", ids).fetchall()
        return [Item(*row) for row in rows]

    def tags_of(self, ids: list[int]) -> dict[int, list[tuple[str, float]]]:
        """Each item's (label, score) tags, best first (items without tags are left out)."""
        if not ids:
            return {}
        found: dict[int, list[tuple[str, float]]] = {}
        with self._lock:
            for id, label, score in self._db.execute(
                    f"SELECT id, label, score FROM tags WHERE id IN ({', '.join('?' * len(ids))}) "
                    f"ORDER BY score DESC, label", ids):
                found.setdefault(id, []).append((label, score))
        return found

    @property
    def float32_bytes(self) -> int:
        return self._copies.nbytes

    @property
    def screen_bytes(self) -> int:
        return self._copies.screen_nbytes

    def close(self) -> None:
        self._db.close()
