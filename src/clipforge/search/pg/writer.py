"""The PostgreSQL store write side. Each batch's items, vectors and skipped files commit in one transaction,
so a run killed at any moment loses at most the batch in flight and no row can point at another file's
vector (the vector is a column of its own row). Runs on the same source take turns through an advisory lock
per source; runs on different sources write at once."""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from clipforge.search.build import Writer, caption_rows, reused, touched
from clipforge.search.pg import hnsw, schema
from clipforge.search.pg.connection import connect, database_errors, vector_type
from clipforge.search.pg.url import parse
from clipforge.search.plan import Entry, Plan

_UPDATE_ALL = """ON CONFLICT (path, key) DO UPDATE SET source = excluded.source, member = excluded.member,
    member_offset = excluded.member_offset, size = excluded.size, mtime_ns = excluded.mtime_ns, hash = excluded.hash,
    width = excluded.width, height = excluded.height, caption = excluded.caption, taken = excluded.taken,
    captured = excluded.captured, captured_from = excluded.captured_from, embedding = excluded.embedding,
    caption_embedding = excluded.caption_embedding
    RETURNING (xmax = 0)"""

_UPSERT = """INSERT INTO {items} AS old (source, path, key, member, member_offset, size, mtime_ns, hash, width,
    height, caption, taken, captured, captured_from, embedding, caption_embedding) VALUES (%s, %s, %s, %s, %s, %s,
    %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) """ + _UPDATE_ALL

# a reused vector is copied inside the database; no row comes back when the donor is gone
_REUSE = """INSERT INTO {items} AS old (source, path, key, member, member_offset, size, mtime_ns, hash, width,
    height, caption, taken, captured, captured_from, embedding, caption_embedding)
    SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, embedding, CAST(%s AS {vectype})
    FROM {items} WHERE id = %s """ + _UPDATE_ALL


class PostgresTarget:
    """A PostgreSQL index as an indexing run writes it."""

    def __init__(self, url: str):
        self.where = parse(url)
        self.location, self.table = self.where.display, self.where.table
        self._conn = None

    @property
    def conn(self):
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.where, create_extension=True)
        return self._conn

    def prepare(self, rebuild: bool) -> None:
        if rebuild:
            with database_errors(self.where, "dropping the index for --rebuild"), \
                    schema.table_lock(self.conn, self.table), self.conn.transaction():
                schema.read_config(self.conn, self.table, self.location)  # refuses a table that is not ours
                schema.drop(self.conn, self.table)

    def read_config(self) -> dict | None:
        with database_errors(self.where, "reading the index configuration"):
            return schema.read_config(self.conn, self.table, self.location)

    def create(self, identity: dict) -> dict:
        """Create the tables with ``identity``, unless a run beside this one created them first: the config
        stored is returned either way (the caller compares its model with this run's)."""
        with database_errors(self.where, "creating the index tables"), schema.table_lock(self.conn, self.table), \
                self.conn.transaction():
            config = schema.read_config(self.conn, self.table, self.location)
            if config is None:
                config = {**identity, "vector_type": vector_type(self.conn)}
                schema.create(self.conn, self.table, int(identity["dim"]), config["vector_type"], config)
        return config

    @contextlib.contextmanager
    def catalog(self):
        with database_errors(self.where, "reading the index"):
            yield PostgresCatalog(self.conn, self.table)

    @contextlib.contextmanager
    def lock_sources(self, sources: list[str]):
        """Hold an advisory lock per source for the run, on a connection of its own: a second run on a source
        waits for the first (and then finds its work done); the locks go with the connection if this process
        dies."""
        keys = sorted({schema.lock_key(self.table, _source_key(s)) for s in sources})
        with database_errors(self.where, "locking the sources"):
            holder = connect(self.where, create_extension=True)
        try:
            for key in keys:
                with database_errors(self.where, "locking the sources"):
                    if not holder.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]:
                        print(f"clipforge index: waiting for another run indexing {key.split(chr(31))[2]} into "
                              f"{self.location}", file=sys.stderr, flush=True)
                        holder.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
            yield
        finally:
            holder.close()

    def writer(self, dim: int, network) -> "PostgresWriter":
        return PostgresWriter(self, network)

    def compact(self) -> dict | None:
        return None  # a deleted or updated row's space is the server's to reclaim (autovacuum)

    def store_tags(self, info: dict, rows: list[tuple[int, str, float]], ids: list[int] | None = None) -> None:
        """Replace the tags of ``ids`` (None: of every item) by ``rows`` (id, label, score) and record ``info``
        in the configuration row, in one transaction; tags of items deleted meanwhile are left out."""
        with database_errors(self.where, "storing tags"), self.conn.transaction(), self.conn.cursor() as cur:
            if ids is None:
                cur.execute(schema.composed("DELETE FROM {tags}", self.table))
            else:
                cur.execute(schema.composed("DELETE FROM {tags} WHERE id = ANY(%s)", self.table), (list(ids),))
            cur.executemany(schema.composed("INSERT INTO {tags} SELECT %s, %s, %s WHERE EXISTS (SELECT 1 FROM {items} "
                                            "WHERE id = %s)", self.table),
                            [(i, label, score, i) for i, label, score in rows])
            config = self.conn.execute(schema.composed("SELECT config FROM {meta} FOR UPDATE", self.table)) \
                .fetchone()[0]
            schema.write_config(self.conn, self.table, {**config, "tags": info})

    def importer(self) -> "PostgresImporter":
        return PostgresImporter(self)

    def refresh_approximate(self, mode: str, max_index_memory: int | None = None,
                            progress: bool = True) -> dict | None:
        if mode == "ivfpq":
            raise ValueError("--approximate ivfpq is the folder store's compressed index; a PostgreSQL index has "
                             "pgvector's HNSW index: use --approximate always (or auto)")
        with database_errors(self.where, "building the HNSW index"):
            return hnsw.refresh(self.conn, self.table, self.location, mode)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _source_key(source: str) -> str:
    """A source as ``list_sources`` records it (folders and tables absolute, shard specs as given)."""
    return os.path.abspath(source) if os.path.exists(source) else source


class PostgresCatalog:
    """Planning's view of the tables (no vectors are read)."""

    def __init__(self, conn, table: str):
        self.conn, self.table = conn, table
        self.ready = schema.exists(conn, schema.names(table)["meta"])

    def _rows(self, text: str, params=()):
        from psycopg.rows import dict_row
        if not self.ready:
            return []
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(schema.composed(text, self.table), params).fetchall()

    def shard_stat(self, path: str) -> tuple[int, int] | None:
        found = self._rows("SELECT size, mtime_ns FROM {shards} WHERE path = %s", (path,))
        return (found[0]["size"], found[0]["mtime_ns"]) if found else None

    _COLUMNS = "id, source, path, key, size, mtime_ns, hash, width, height, caption, taken, captured, captured_from"

    def items(self):
        return self._rows(f"SELECT {self._COLUMNS} FROM {{items}}")

    def skipped(self):
        return self._rows("SELECT * FROM {skipped}")

    def item_at(self, path: str, key: str):
        found = self._rows(f"SELECT {self._COLUMNS} FROM {{items}} WHERE path = %s AND key = %s", (path, key))
        return found[0] if found else None

    def shards(self):
        return self._rows("SELECT * FROM {shards}")

    def first_with_hash(self, digest: str):
        found = self._rows(f"SELECT {self._COLUMNS} FROM {{items}} WHERE hash = %s ORDER BY id LIMIT 1", (digest,))
        return found[0] if found else None


class PostgresWriter(Writer):
    """Commits each batch in one transaction; counts come from what the database did (an item another run
    inserted meanwhile is counted as updated)."""

    def __init__(self, target: PostgresTarget, network):
        super().__init__(network)
        self.target, self.conn, self.table = target, target.conn, target.table
        self.vector = target.read_config().get("vector_type", "vector")

    def _sql(self, text: str):
        return schema.composed(text, self.table, vectype=self.vector)

    def _adapt(self, vector: np.ndarray | None):
        if vector is None:
            return None
        if self.vector == "halfvec":
            from pgvector import HalfVector
            return HalfVector(np.asarray(vector, dtype=np.float32))
        return np.asarray(vector, dtype=np.float32)

    def apply_plan(self, plan: Plan) -> None:
        """Copied vectors first (a renamed file's donor is among the removed), then removals, metadata-only
        updates and read errors in one transaction."""
        for start in range(0, len(plan.reused), 256):
            self._store_reused(plan.reused[start:start + 256])
        with database_errors(self.target.where, "updating the index"), self.conn.transaction():
            if plan.removed:
                self.conn.execute(self._sql("DELETE FROM {items} WHERE id = ANY(%s)"), (list(plan.removed),))
            for entry, _, item in plan.touched:
                self.conn.execute(self._sql("UPDATE {items} SET source = %s, size = %s, mtime_ns = %s, member = %s, "
                                            "member_offset = %s, captured = %s, captured_from = %s WHERE id = %s"),
                                  (entry.source, entry.size, entry.mtime_ns, entry.member, entry.offset,
                                   *touched(item, entry), item["id"]))
            self._record_bad(plan.bad)

    def _store_reused(self, chunk: list) -> None:
        captions = caption_rows(self.network, [entry.caption for entry, _, _ in chunk])
        with database_errors(self.target.where, "copying reused vectors"), self.conn.transaction():
            for (entry, digest, donor), caption in zip(chunk, captions):
                width, height, taken, captured, captured_from = reused(donor, entry)
                self._drop_tags(entry)
                found = self.conn.execute(self._sql(_REUSE), (
                    *_columns(entry, digest), width, height, entry.caption, taken, captured, captured_from,
                    self._adapt(caption), donor["id"])).fetchone()
                if found is None:
                    self.orphans.append((entry, digest))
                    continue
                self.conn.execute(self._sql("DELETE FROM {skipped} WHERE path = %s AND key = %s"),
                                  (entry.path, entry.key))
                self.counts["reused"] += 1
                self.counts["indexed" if found[0] else "updated"] += 1

    def _commit(self, records: list, vectors: np.ndarray | None, bad: list = ()) -> None:
        with database_errors(self.target.where, "storing a batch"), self.conn.transaction():
            for (entry, digest, info, caption), vector in zip(records, vectors if vectors is not None else []):
                self._drop_tags(entry)
                inserted = self.conn.execute(self._sql(_UPSERT), (
                    *_columns(entry, digest), info[0], info[1], entry.caption, info[2], info[3], info[4],
                    self._adapt(vector), self._adapt(caption))).fetchone()[0]
                self.counts["indexed" if inserted else "updated"] += 1
                self.conn.execute(self._sql("DELETE FROM {skipped} WHERE path = %s AND key = %s"),
                                  (entry.path, entry.key))
            self._record_bad(bad)

    def _drop_tags(self, entry: Entry) -> None:
        """The tags of the content a path held: it is about to hold other content (removals cascade)."""
        self.conn.execute(self._sql("DELETE FROM {tags} WHERE id IN (SELECT id FROM {items} WHERE path = %s AND "
                                    "key = %s)"), (entry.path, entry.key))

    def _record_bad(self, bad) -> None:
        for entry, reason, message in bad:
            self.skipped[reason] += 1
            gone = self.conn.execute(self._sql("DELETE FROM {items} WHERE path = %s AND key = %s"),
                                     (entry.path, entry.key)).rowcount
            self.counts["removed"] += gone  # its stored vector was of content the file no longer holds
            self.conn.execute(self._sql(
                "INSERT INTO {skipped} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (path, key) DO UPDATE SET "
                "size = excluded.size, mtime_ns = excluded.mtime_ns, reason = excluded.reason, "
                "message = excluded.message"), (entry.path, entry.key, entry.size, entry.mtime_ns, reason, message))

    def finish(self, listing) -> None:
        shards = sorted({e.path for e in listing.entries if e.key})
        with database_errors(self.target.where, "recording the shards"), self.conn.transaction():
            for shard in shards:
                stat = os.stat(shard)
                self.conn.execute(self._sql("INSERT INTO {shards} VALUES (%s, %s, %s) ON CONFLICT (path) DO UPDATE "
                                            "SET size = excluded.size, mtime_ns = excluded.mtime_ns"),
                                  (shard, stat.st_size, stat.st_mtime_ns))

    def _count(self) -> int:
        with database_errors(self.target.where, "counting the items"):
            return self.conn.execute(self._sql("SELECT count(*) FROM {items}")).fetchone()[0]


class PostgresImporter:
    """Writes copied items under their own ids, a chunk a transaction (``clipforge.search.transfer``)."""

    def __init__(self, target: PostgresTarget):
        self.target, self.conn = target, target.conn
        self.writer = PostgresWriter(target, None)

    def add(self, items: list, vectors: np.ndarray, captions: dict) -> None:
        adapt, sql = self.writer._adapt, self.writer._sql
        with database_errors(self.target.where, "copying items"), self.conn.transaction():
            with self.conn.cursor() as cur:
                cur.executemany(sql(
                    "INSERT INTO {items} (id, source, path, key, member, member_offset, size, mtime_ns, hash, width, "
                    "height, caption, taken, captured, captured_from, embedding, caption_embedding) OVERRIDING SYSTEM "
                    "VALUE VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"),
                    [(item.id, item.source, item.path, item.key, item.member, item.offset, item.size, item.mtime_ns,
                      item.hash, item.width, item.height, item.caption, item.taken, item.captured, item.captured_from,
                      adapt(vector), adapt(captions.get(item.id))) for item, vector in zip(items, vectors)])
            # the next item indexed here gets an id after every copied one
            self.conn.execute(sql("SELECT setval(pg_get_serial_sequence(%s, 'id'), "
                                  "(SELECT max(id) FROM {items}))"), (f'"{self.target.table}"',))

    def add_skipped(self, rows: list) -> None:
        with database_errors(self.target.where, "copying skipped files"), self.conn.transaction():
            for r in rows:
                self.conn.execute(self.writer._sql("INSERT INTO {skipped} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT "
                                                   "(path, key) DO NOTHING"),
                                  (r["path"], r["key"], r["size"], r["mtime_ns"], r["reason"], r["message"]))

    def add_shards(self, rows: list) -> None:
        with database_errors(self.target.where, "copying shards"), self.conn.transaction():
            for r in rows:
                self.conn.execute(self.writer._sql("INSERT INTO {shards} VALUES (%s, %s, %s) ON CONFLICT (path) DO "
                                                   "NOTHING"), (r["path"], r["size"], r["mtime_ns"]))

    def close(self) -> None:
        pass


def _columns(entry: Entry, digest: str) -> tuple:
    return (entry.source, entry.path, entry.key, entry.member, entry.offset, entry.size, entry.mtime_ns, digest)
