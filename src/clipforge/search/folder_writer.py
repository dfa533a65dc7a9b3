"""The folder store write side: a batch's vectors are written into segment rows past every committed row and
flushed to disk before one SQLite transaction commits the items that point at them (``clipforge.search.store``
describes the files)."""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np

from clipforge.search import approximate, store
from clipforge.search.build import Writer, caption_rows, reused, touched
from clipforge.search.plan import Entry, Plan


class FolderTarget:
    """An index folder as an indexing run writes it (one writer at a time)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.location = str(folder)

    def prepare(self, rebuild: bool) -> None:
        """Start over on ``rebuild``, or where no config.json says an index was created (a run killed before
        it could record its model leaves files that nothing points at)."""
        if rebuild or store.read_config(self.folder) is None:
            _clear(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def read_config(self) -> dict | None:
        return store.read_config(self.folder)

    def create(self, identity: dict) -> dict:
        config = {"format_version": store.FORMAT_VERSION, "segment_rows": store.SEGMENT_ROWS, **identity}
        store.write_config(self.folder, config)
        return config

    @contextlib.contextmanager
    def catalog(self):
        with contextlib.closing(store.connect(self.folder)) as db:
            yield FolderCatalog(db)

    def lock_sources(self, sources: list[str]):
        return contextlib.nullcontext()  # one writer at a time is the folder store's rule

    def writer(self, dim: int, network) -> "FolderWriter":
        return FolderWriter(self.folder, dim, network)

    def importer(self) -> "FolderImporter":
        return FolderImporter(self.folder, int(self.read_config()["dim"]))

    def refresh_approximate(self, mode: str, max_index_memory: int | None = None,
                            progress: bool = True) -> dict | None:
        return approximate.refresh(self.folder, mode, max_index_memory, progress)

    def compact(self) -> dict | None:
        """Reclaim the rows of deleted and changed items once they are half the used rows
        (``clipforge.search.store.compact``)."""
        config = store.read_config(self.folder)
        return store.compact(self.folder, int(config["dim"])) if config is not None else None

    def store_tags(self, info: dict, rows: list[tuple[int, str, float]], ids: list[int] | None = None) -> None:
        """Replace the tags of ``ids`` (None: of every item) by ``rows`` (id, label, score) in one transaction,
        then record ``info`` (the label set and threshold) in config.json."""
        with contextlib.closing(store.connect(self.folder)) as db, db:
            if ids is None:
                db.execute("DELETE FROM tags")
            else:
                db.executemany("DELETE FROM tags WHERE id = ?", [(i,) for i in ids])
            db.executemany("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", rows)
        store.write_config(self.folder, {**store.read_config(self.folder), "tags": info})

    def close(self) -> None:
        pass


def _clear(folder: Path) -> None:
    """Remove this index's own files (and only those) from ``folder``."""
    if not folder.exists():
        return
    names = [store.CONFIG, store.DATABASE, store.DATABASE + "-wal", store.DATABASE + "-shm"]
    for path in folder.iterdir():
        if path.name in names or path.name.startswith(tuple(f"{k}-" for k in store.KINDS)) \
                or path.name.startswith("approximate"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


class FolderCatalog:
    """Planning's view of the metadata database."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def shard_stat(self, path: str) -> tuple[int, int] | None:
        found = self.db.execute("SELECT size, mtime_ns FROM shards WHERE path = ?", (path,)).fetchone()
        return tuple(found) if found is not None else None

    def items(self):
        return self.db.execute("SELECT * FROM items")

    def skipped(self):
        return self.db.execute("SELECT * FROM skipped")

    def item_at(self, path: str, key: str):
        return self.db.execute("SELECT * FROM items WHERE path = ? AND key = ?", (path, key)).fetchone()

    def shards(self):
        return self.db.execute("SELECT * FROM shards")

    def first_with_hash(self, digest: str):
        # vector rows are never overwritten, so a donor removed by this run's plan still holds its vector
        return self.db.execute("SELECT * FROM items WHERE hash = ? ORDER BY id LIMIT 1", (digest,)).fetchone()


class FolderWriter(Writer):
    """Writes vectors, then commits the rows that point at them, one transaction a batch."""

    def __init__(self, folder: Path, dim: int, network):
        super().__init__(network)
        self.folder = folder
        self.db = store.connect(folder)
        self.generation = store.current_generation(self.db)
        self.segments = {kind: store.SegmentWriter(folder, kind, dim, self.generation) for kind in store.KINDS}
        self.existing = {(r[0], r[1]) for r in self.db.execute("SELECT path, key FROM items")}

    def apply_plan(self, plan: Plan) -> None:
        """Removals, metadata-only updates and read errors in one transaction; then copied vectors."""
        with self.db:
            self.db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in plan.removed])
            self.db.executemany("DELETE FROM tags WHERE id = ?", [(i,) for i in plan.removed])
            self.db.executemany("UPDATE items SET source = ?, size = ?, mtime_ns = ?, member = ?, offset = ?, "
                                "captured = ?, captured_from = ? WHERE id = ?",
                                [(e.source, e.size, e.mtime_ns, e.member, e.offset, *touched(item, e), item["id"])
                                 for e, _, item in plan.touched])
            self._record_bad([(entry, reason, message) for entry, reason, message in plan.bad])
        for start in range(0, len(plan.reused), 256):
            self._store_reused(plan.reused[start:start + 256])

    def _store_reused(self, chunk: list) -> None:
        images = store.open_segments(self.folder, "images", store.next_row(self.db, "images"), self.generation)
        rows = [donor["row"] for _, _, donor in chunk]
        vectors = np.stack([images[r // store.SEGMENT_ROWS][r % store.SEGMENT_ROWS] for r in rows])
        captions = caption_rows(self.network, [entry.caption for entry, _, _ in chunk])
        records = [(entry, digest, reused(donor, entry), caption)
                   for (entry, digest, donor), caption in zip(chunk, captions)]
        self._commit(records, vectors)
        self.counts["reused"] += len(chunk)

    def _commit(self, records: list, vectors: np.ndarray | None, bad: list = ()) -> None:
        first = store.next_row(self.db, "images")
        first_caption = store.next_row(self.db, "captions")
        caption_rows, captions = [], []
        for _, _, _, caption in records:
            caption_rows.append(first_caption + len(captions) if caption is not None else None)
            if caption is not None:
                captions.append(caption)
        if vectors is not None:
            self.segments["images"].write(first, vectors)
        if captions:
            self.segments["captions"].write(first_caption, np.stack(captions))
        with self.db:
            for offset, ((entry, digest, info, _), caption_row) in enumerate(zip(records, caption_rows)):
                self._upsert(entry, digest, info, first + offset, caption_row)
            self._record_bad(bad)
            self.db.execute("INSERT OR REPLACE INTO rows VALUES ('images', ?)", (first + len(records),))
            self.db.execute("INSERT OR REPLACE INTO rows VALUES ('captions', ?)", (first_caption + len(captions),))

    def _upsert(self, entry: Entry, digest: str, info: tuple, row: int, caption_row: int | None) -> None:
        key = (entry.path, entry.key)
        self.counts["updated" if key in self.existing else "indexed"] += 1
        if key in self.existing:  # new content: the old content's tags go
            self.db.execute("DELETE FROM tags WHERE id IN (SELECT id FROM items WHERE path = ? AND key = ?)", key)
        self.existing.add(key)
        self.db.execute(
            "INSERT INTO items (source, path, key, member, offset, size, mtime_ns, hash, width, height, caption, "
            "taken, row, caption_row, captured, captured_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (path, key) DO UPDATE SET source = excluded.source, member = excluded.member, "
            "offset = excluded.offset, size = excluded.size, mtime_ns = excluded.mtime_ns, hash = excluded.hash, "
            "width = excluded.width, height = excluded.height, caption = excluded.caption, taken = excluded.taken, "
            "row = excluded.row, caption_row = excluded.caption_row, captured = excluded.captured, "
            "captured_from = excluded.captured_from",
            (entry.source, entry.path, entry.key, entry.member, entry.offset, entry.size, entry.mtime_ns, digest,
             info[0], info[1], entry.caption, info[2], row, caption_row, info[3], info[4]))
        self.db.execute("DELETE FROM skipped WHERE path = ? AND key = ?", key)

    def _record_bad(self, bad) -> None:
        for entry, reason, message in bad:
            self.skipped[reason] += 1
            key = (entry.path, entry.key)
            if key in self.existing:  # its stored vector is of content the file no longer holds
                self.db.execute("DELETE FROM tags WHERE id IN (SELECT id FROM items WHERE path = ? AND key = ?)", key)
                self.db.execute("DELETE FROM items WHERE path = ? AND key = ?", key)
                self.existing.discard(key)
                self.counts["removed"] += 1
            self.db.execute("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?, ?, ?)",
                            (entry.path, entry.key, entry.size, entry.mtime_ns, reason, message))

    def finish(self, listing) -> None:
        """Record the shards now fully indexed, so that an unchanged shard is not read again."""
        shards = sorted({e.path for e in listing.entries if e.key})
        with self.db:
            for shard in shards:
                stat = os.stat(shard)
                self.db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?)",
                                (shard, stat.st_size, stat.st_mtime_ns))

    def _count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def close(self) -> None:
        for writer in self.segments.values():
            writer.close()
        self.db.close()


class FolderImporter:
    """Writes copied items under their own ids, each chunk's vectors flushed before the transaction that
    commits its rows (``clipforge.search.transfer``)."""

    def __init__(self, folder: Path, dim: int):
        self.db = store.connect(folder)
        generation = store.current_generation(self.db)
        self.segments = {kind: store.SegmentWriter(folder, kind, dim, generation) for kind in store.KINDS}

    def add(self, items: list, vectors: np.ndarray, captions: dict) -> None:
        first, first_caption = store.next_row(self.db, "images"), store.next_row(self.db, "captions")
        caption_rows = {}
        for item in items:
            if item.id in captions:
                caption_rows[item.id] = first_caption + len(caption_rows)
        self.segments["images"].write(first, vectors.astype(np.float16))
        if caption_rows:
            self.segments["captions"].write(first_caption, np.stack([captions[i] for i in caption_rows])
                                            .astype(np.float16))
        with self.db:
            self.db.executemany(
                f"INSERT INTO items ({', '.join(store.ITEM_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(store.ITEM_COLUMNS))})",
                [(item.id, item.source, item.path, item.key, item.member, item.offset, item.size, item.mtime_ns,
                  item.hash, item.width, item.height, item.caption, item.taken, first + j, caption_rows.get(item.id),
                  item.captured, item.captured_from)
                 for j, item in enumerate(items)])
            self.db.execute("INSERT OR REPLACE INTO rows VALUES ('images', ?)", (first + len(items),))
            self.db.execute("INSERT OR REPLACE INTO rows VALUES ('captions', ?)", (first_caption + len(caption_rows),))

    def add_skipped(self, rows: list) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?, ?, ?)",
                                [(r["path"], r["key"], r["size"], r["mtime_ns"], r["reason"], r["message"])
                                 for r in rows])

    def add_shards(self, rows: list) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO shards VALUES (?, ?, ?)",
                                [(r["path"], r["size"], r["mtime_ns"]) for r in rows])

    def close(self) -> None:
        for writer in self.segments.values():
            writer.close()
        self.db.close()
