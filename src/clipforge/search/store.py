"""The on-disk index: ``config.json``, float16 ``.npy`` vector segments and the SQLite metadata.

Crash safety: a batch's vectors are written into rows past every committed row and flushed to disk
before one SQLite transaction commits the rows that point at them; readers trust committed rows only.
Compaction writes the live rows into a new generation of segment files, flushed before the transaction that
points the items at them; files of other generations are removed after it.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np

from clipforge.io.runs import write_files
from clipforge.search.records import captured_from_exif_text

FORMAT_VERSION = 1
SEGMENT_ROWS = 65536  # rows per .npy segment file
CONFIG, DATABASE = "config.json", "metadata.sqlite"
KINDS = ("images", "captions")  # the two sets of vectors; a segment is KIND-NNNNN.npy
COMPACT_MIN_DEAD_ROWS = SEGMENT_ROWS // 4  # dead rows below this are left alone, however large their share

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,         -- the folder, table or shard spec it was found through
    path TEXT NOT NULL,           -- the image file, or the shard holding it
    key TEXT NOT NULL DEFAULT '', -- the sample key inside a shard; '' for a file
    member TEXT,                  -- the tar member holding the image
    offset INTEGER,               -- where that member's bytes start in the shard
    size INTEGER NOT NULL,        -- bytes of the encoded image
    mtime_ns INTEGER NOT NULL,    -- modification time of the file (or shard), nanoseconds
    hash TEXT NOT NULL,           -- BLAKE2b-128 of the encoded image bytes, hex
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    caption TEXT,
    taken TEXT,                   -- EXIF DateTimeOriginal, 'YYYY:MM:DD HH:MM:SS'
    row INTEGER NOT NULL,         -- row of its image vector (segment row // SEGMENT_ROWS)
    caption_row INTEGER,          -- row of its caption vector, if it has a caption
    captured TEXT,                -- ISO 8601 capture time: EXIF (with its offset when known), else mtime
    captured_from TEXT,           -- 'exif' or 'mtime'
    UNIQUE (path, key)
);
CREATE INDEX IF NOT EXISTS items_hash ON items (hash);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT NOT NULL, key TEXT NOT NULL DEFAULT '', size INTEGER, mtime_ns INTEGER,
    reason TEXT NOT NULL, message TEXT NOT NULL, PRIMARY KEY (path, key)
);
CREATE TABLE IF NOT EXISTS shards (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows (kind TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);  -- 'generation' of segments
CREATE TABLE IF NOT EXISTS tags (          -- clipforge tag: labels of an item's image, with their scores
    id INTEGER NOT NULL, label TEXT NOT NULL, score REAL NOT NULL, PRIMARY KEY (id, label)
);
CREATE INDEX IF NOT EXISTS tags_label ON tags (label);
"""

ITEM_COLUMNS = ("id", "source", "path", "key", "member", "offset", "size", "mtime_ns", "hash", "width", "height",
                "caption", "taken", "row", "caption_row", "captured", "captured_from")


def read_config(folder: Path) -> dict | None:
    """The index's config.json, or None if the folder holds no index yet."""
    path = folder / CONFIG
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} holds a search index of format version {config.get('format_version')}; "
                         f"this clipforge reads version {FORMAT_VERSION}: rebuild it with --rebuild")
    return config


def write_config(folder: Path, config: dict) -> None:
    """Replace config.json atomically (write, fsync, rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_files(folder, {CONFIG: lambda path: path.write_text(json.dumps(config, indent=2) + "\n")})


def connect(folder: Path, readonly: bool = False) -> sqlite3.Connection:
    """The metadata database (created with its schema unless ``readonly``)."""
    path = folder / DATABASE
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        _add_capture_times(db)
    db.row_factory = sqlite3.Row
    return db


def has_capture_times(db: sqlite3.Connection) -> bool:
    return "captured" in {row[1] for row in db.execute("PRAGMA table_info(items)")}


def _add_capture_times(db: sqlite3.Connection) -> None:
    """Give an index written before capture times were recorded its ``captured`` columns, filled from the
    EXIF date it kept (``taken``, without offset) or the file's mtime, in one transaction; nothing is read
    from the images again."""
    if has_capture_times(db):
        return
    with db:
        db.execute("ALTER TABLE items ADD COLUMN captured TEXT")
        db.execute("ALTER TABLE items ADD COLUMN captured_from TEXT")
        updates = [(*captured_from_exif_text(taken, mtime_ns), id)
                   for id, taken, mtime_ns in db.execute("SELECT id, taken, mtime_ns FROM items").fetchall()]
        db.executemany("UPDATE items SET captured = ?, captured_from = ? WHERE id = ?", updates)


def next_row(db: sqlite3.Connection, kind: str) -> int:
    """The first row of ``kind`` that no committed item uses or has used."""
    found = db.execute("SELECT next FROM rows WHERE kind = ?", (kind,)).fetchone()
    return found[0] if found else 0


def int_columns(db: sqlite3.Connection, query: str) -> np.ndarray:
    """The integer columns (none NULL: coalesce them) of ``query``'s rows as int64 (rows, columns), fetched in
    chunks: no Python object per row outlives its chunk, which matters at millions of items."""
    cursor = db.cursor()
    cursor.row_factory = None
    cursor.execute(query)
    columns, parts = len(cursor.description), []
    while chunk := cursor.fetchmany(65536):
        parts.append(np.array(chunk, dtype=np.int64))
    return np.concatenate(parts) if parts else np.empty((0, columns), dtype=np.int64)


def current_generation(db: sqlite3.Connection) -> int:
    """Which set of segment files the committed rows point into: 0 at first, one more after each compaction."""
    try:
        found = db.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()
    except sqlite3.OperationalError:  # an index written before compaction existed has no state table
        return 0
    return found[0] if found else 0


def segment_path(folder: Path, kind: str, number: int, generation: int = 0) -> Path:
    """Segment ``number`` of ``kind``: ``images-00000.npy`` in generation 0, ``images-g0001-00000.npy`` after
    the first compaction."""
    return folder / (f"{kind}-{number:05d}.npy" if generation == 0 else f"{kind}-g{generation:04d}-{number:05d}.npy")


class SegmentWriter:
    """Writes L2-normalised float16 vectors into fixed-size ``.npy`` segments, creating them as needed.

    A segment is created whole (header for SEGMENT_ROWS rows, file sparse until written) under a temporary
    name and renamed into place, so a segment on disk always has a valid header.
    """

    def __init__(self, folder: Path, kind: str, dim: int, generation: int = 0):
        self.folder, self.kind, self.dim, self.generation = folder, kind, dim, generation
        self._open: dict[int, tuple[np.memmap, int]] = {}  # segment number -> (its map, a descriptor to fsync)

    def _create(self, path: Path) -> None:
        tmp = path.with_suffix(".npy.tmp")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                  "shape": (SEGMENT_ROWS, self.dim)}
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.truncate(f.tell() + SEGMENT_ROWS * self.dim * 2)  # zero rows, sparse until written
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _segment(self, number: int) -> tuple[np.memmap, int]:
        if number not in self._open:
            path = segment_path(self.folder, self.kind, number, self.generation)
            if not path.exists():
                self._create(path)
            self._open[number] = (np.load(path, mmap_mode="r+"), os.open(path, os.O_RDONLY))
        return self._open[number]

    def write(self, first_row: int, vectors: np.ndarray) -> None:
        """Write ``vectors`` (N, dim) at rows ``first_row ...`` and flush them to disk."""
        touched, start = set(), 0
        while start < len(vectors):
            number, within = divmod(first_row + start, SEGMENT_ROWS)
            count = min(len(vectors) - start, SEGMENT_ROWS - within)
            self._segment(number)[0][within:within + count] = vectors[start:start + count]
            touched.add(number)
            start += count
        for number in touched:
            segment, fd = self._open[number]
            segment.flush()
            os.fsync(fd)

    def close(self) -> None:
        for _, fd in self._open.values():
            os.close(fd)
        self._open.clear()


def open_segments(folder: Path, kind: str, rows: int, generation: int | None = None) -> list[np.ndarray]:
    """Read-only memory maps of the segments covering rows ``0 .. rows - 1``, each cut to its used rows
    (``generation``: the committed one when None)."""
    return [segment for segment, _ in open_identified_segments(folder, kind, rows, generation)]


def open_identified_segments(folder: Path, kind: str, rows: int,
                             generation: int | None = None) -> list[tuple[np.ndarray, tuple]]:
    """(memory map cut to its used rows, identity) of each segment covering rows ``0 .. rows - 1``. The
    identity (device, inode, used rows) is that of the file mapped: equal identities hold equal rows, as
    committed rows are never rewritten, and a rebuilt or compacted index writes new files."""
    if generation is None:
        with contextlib.closing(connect(folder, readonly=True)) as db:
            generation = current_generation(db)
    found = []
    for number in range((rows + SEGMENT_ROWS - 1) // SEGMENT_ROWS):
        used = min(SEGMENT_ROWS, rows - number * SEGMENT_ROWS)
        path = segment_path(folder, kind, number, generation)
        before = None
        while before is None or os.stat(path).st_ino != before.st_ino:  # replaced while mapping: map again
            before = os.stat(path)
            segment = np.load(path, mmap_mode="r")[:used]
        found.append((segment, (before.st_dev, before.st_ino, used)))
    return found


def gather(segments: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The float32 vectors (N, dim) at ``rows`` (N,) of a kind's segments (``open_segments``), in that order."""
    out = np.empty((len(rows), segments[0].shape[1] if segments else 0), dtype=np.float32)
    numbers = rows // SEGMENT_ROWS
    for number in np.unique(numbers):
        inside = np.nonzero(numbers == number)[0]
        out[inside] = segments[number][rows[inside] % SEGMENT_ROWS]
    return out


def compact(folder: Path, dim: int, min_dead: float = 0.5) -> dict | None:
    """Rewrite the live vectors into a new generation of segments when at least ``min_dead`` of the used rows
    (and at least one segment's worth) belong to no item: deleted and changed files leave their rows behind.
    Readers keep the files they mapped until they refresh; a crash before the commit leaves the old generation
    in force (and the new files are removed next time), after it the old files are removed next time. Returns
    what was done, or None."""
    with contextlib.closing(connect(folder)) as db:
        old = current_generation(db)
        _remove_other_generations(folder, old)
        live = db.execute("SELECT id, row, caption_row FROM items ORDER BY id").fetchall()
        used = {kind: next_row(db, kind) for kind in KINDS}
        dead = used["images"] + used["captions"] - len(live) - sum(1 for r in live if r[2] is not None)
        if dead < COMPACT_MIN_DEAD_ROWS or dead < min_dead * (used["images"] + used["captions"]):
            return None
        new = old + 1
        moves, counts = {}, {}
        for kind, column in (("images", 1), ("captions", 2)):
            rows = np.array([r[column] for r in live if r[column] is not None], dtype=np.int64)
            segments = open_segments(folder, kind, used[kind], old)
            writer = SegmentWriter(folder, kind, dim, new)
            for start in range(0, len(rows), SEGMENT_ROWS):
                chunk = rows[start:start + SEGMENT_ROWS]
                block = np.empty((len(chunk), dim), dtype=np.float16)
                for number in np.unique(chunk // SEGMENT_ROWS):
                    inside = np.nonzero(chunk // SEGMENT_ROWS == number)[0]
                    block[inside] = segments[number][chunk[inside] % SEGMENT_ROWS]
                writer.write(start, block)
            writer.close()
            moves[kind] = dict(zip(rows.tolist(), range(len(rows))))
            counts[kind] = len(rows)
        with db:
            db.executemany("UPDATE items SET row = ?, caption_row = ? WHERE id = ?",
                           [(moves["images"][r], moves["captions"].get(c) if c is not None else None, i)
                            for i, r, c in live])
            for kind in KINDS:
                db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?)", (kind, counts[kind]))
            db.execute("INSERT OR REPLACE INTO state VALUES ('generation', ?)", (new,))
        _remove_other_generations(folder, new)
    return {"generation": new, "rows_before": used, "rows_after": counts}


def _remove_other_generations(folder: Path, keep: int) -> None:
    """Segment files of any generation but ``keep`` (left by a compaction, or by one that crashed)."""
    for path in folder.iterdir():
        for kind in KINDS:
            if path.name.startswith(f"{kind}-") and path.suffix in (".npy", ".tmp"):
                name = path.name
                found = 0 if name[len(kind) + 1:len(kind) + 2] != "g" else int(name[len(kind) + 2:len(kind) + 6])
                if found != keep:
                    path.unlink(missing_ok=True)
