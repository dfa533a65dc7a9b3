"""The PostgreSQL store read side: exact search by inner product in SQL, the HNSW index when it is built,
filters in the same statement, items and vectors by id. Every read sees what writers have committed, so a
service never needs a restart to show new items."""
from __future__ import annotations

import threading

import numpy as np

from clipforge.search.pg import hnsw, schema
from clipforge.search.pg.connection import connect, database_errors, driver
from clipforge.search.pg.url import parse
from clipforge.search.records import Filters, Item


class PostgresStore:
    """An index table, opened for reading. One connection, used under a lock; a connection lost between
    queries (a restarted server) is opened again on the next one."""

    kind = "postgresql"

    def __init__(self, url: str):
        self.where = parse(url)
        self.location, self.table = self.where.display, self.where.table
        self._lock = threading.RLock()
        self._conn = connect(self.where)
        self.config = self._read_config()

    def _read_config(self) -> dict:
        with database_errors(self.where, "opening the index"):
            config = schema.read_config(self._conn, self.table, self.location)
        if config is None:
            raise FileNotFoundError(f"no search index in table {self.table} at {self.location}; build one with "
                                    f"`clipforge index SOURCE... --model MODEL --index URL`")
        return config

    def _run(self, doing: str, work):
        """``work(conn)`` under the lock; one retry on a fresh connection if the old one was lost."""
        psycopg = driver()
        with self._lock:
            try:
                if self._conn.closed:
                    raise psycopg.OperationalError("the connection was closed")
                return work(self._conn)
            except psycopg.OperationalError:
                if not self._conn.closed and not self._conn.broken:
                    raise
            self._conn = connect(self.where)
            with database_errors(self.where, doing):
                return work(self._conn)

    def _sql(self, text: str, **extra):
        return schema.composed(text, self.table, **extra)

    @property
    def _vector(self) -> str:
        return self.config.get("vector_type", "vector")

    def refresh(self) -> None:
        """Re-read the configuration (a new HNSW index, its ef_search); items are always read live."""
        self.config = self._run("reading the configuration", lambda conn: self._read_config())

    def __len__(self) -> int:
        return self._run("counting the items", lambda conn: conn.execute(self._sql(
            "SELECT count(*) FROM {items}")).fetchone()[0])

    def ids(self, captions: bool = False) -> np.ndarray:
        where = "WHERE caption_embedding IS NOT NULL" if captions else ""
        rows = self._run("listing the items", lambda conn: conn.execute(self._sql(
            f"SELECT id FROM {{items}} {where} ORDER BY id")).fetchall())
        return np.array([r[0] for r in rows], dtype=np.int64)

    def vectors(self, ids, captions: bool = False) -> np.ndarray:
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64)]
        column = "caption_embedding" if captions else "embedding"
        rows = self._run("reading vectors", lambda conn: conn.execute(self._sql(
            f"SELECT id, {column} FROM {{items}} WHERE id = ANY(%s) AND {column} IS NOT NULL"), (ids,)).fetchall())
        found = {r[0]: hnsw._floats(r[1]) for r in rows}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"no {'caption ' if captions else ''}vector for item {missing[0]} in this index")
        out = np.empty((len(ids), int(self.config["dim"])), dtype=np.float32)
        for j, i in enumerate(ids):
            out[j] = found[i]
        return out

    def ranked(self, vector: np.ndarray, limit: int, filters: Filters = Filters(), captions: bool = False,
               min_score: float | None = None, approximate: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the best ``limit`` items, best first (exact: ties by id), in one statement."""
        column, q = "caption_embedding" if captions else "embedding", hnsw.query_param(self._vector, vector)
        conditions, params = self._where(column, q, filters, min_score)
        ef = self._ef_search(approximate, filters, captions, limit)
        order = f"{column} <#> %s" + (", id" if ef is None else "")  # a tie-break would keep HNSW out
        statement = self._sql(f"SELECT id, -({column} <#> %s) FROM {{items}} WHERE {conditions} "
                              f"ORDER BY {order} LIMIT %s")
        return self._search(statement, (q, *params, q, int(limit)), ef)

    def by_date(self, vector: np.ndarray, limit: int, filters: Filters = Filters(), captions: bool = False,
                min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the first ``limit`` items at or above ``min_score``, newest capture first (ties
        by score, then id), in one statement."""
        column, q = "caption_embedding" if captions else "embedding", hnsw.query_param(self._vector, vector)
        conditions, params = self._where(column, q, filters, min_score)
        statement = self._sql(f"SELECT id, -({column} <#> %s) AS score FROM {{items}} WHERE {conditions} "
                              f"ORDER BY substr(captured, 1, 19) DESC NULLS LAST, score DESC, id LIMIT %s")
        return self._search(statement, (q, *params, int(limit)), None)

    @staticmethod
    def _where(column: str, q, filters: Filters, min_score: float | None) -> tuple[str, list]:
        """The WHERE clause of a search and its parameters: every value a parameter, never SQL text."""
        conditions, params = filters.sql("postgresql", tags_table="{tags}")
        conditions.insert(0, f"{column} IS NOT NULL")
        if min_score is not None:
            conditions.append(f"({column} <#> %s) <= %s")
            params += [q, -float(min_score)]
        return " AND ".join(conditions), params

    def _search(self, statement, arguments: tuple, ef: int | None) -> tuple[np.ndarray, np.ndarray]:

        def work(conn):
            with conn.transaction():
                if ef is None:
                    conn.execute("SET LOCAL enable_indexscan = off")
                else:
                    conn.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
                return conn.execute(statement, arguments).fetchall()

        rows = self._run("searching", work)
        return (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.float32))

    def _ef_search(self, approximate: bool | None, filters: Filters, captions: bool, limit: int) -> int | None:
        """ef_search for an HNSW search, or None for exact search."""
        if approximate is False:
            return None
        info = self.config.get("approximate")
        usable = info is not None and not filters and not captions and limit <= hnsw.MAX_EF_SEARCH
        if approximate and not usable:
            raise ValueError("no approximate search here: the index has no HNSW index (build one with "
                             "`clipforge index ... --approximate always`), or a filter, dedup or captions was given, "
                             f"or more than {hnsw.MAX_EF_SEARCH} results were asked for")
        return max(int(info["ef_search"]), limit) if usable else None

    def search_batch(self, queries: np.ndarray, top_k: int, approximate: bool = False):
        found = [self.ranked(q, top_k, approximate=approximate) for q in queries]
        ids = np.full((len(queries), top_k), -1, dtype=np.int64)
        scores = np.full((len(queries), top_k), -np.inf, dtype=np.float32)
        for j, (i, s) in enumerate(found):
            ids[j, :len(i)], scores[j, :len(s)] = i, s
        return ids, scores

    def items(self, ids: list[int]) -> list[Item]:
        if not ids:
            return []
        columns = ", ".join((*schema.ITEM_COLUMNS, "NULL", "NULL", *schema.CAPTURE_COLUMNS))
        rows = self._run("reading items", lambda conn: conn.execute(self._sql(
            f"SELECT {columns} FROM {{items}} WHERE id = ANY(%s)"), ([int(i) for i in ids],)).fetchall())
        return [Item(*row) for row in rows]

    def tags_of(self, ids: list[int]) -> dict[int, list[tuple[str, float]]]:
        """Each item's (label, score) tags, best first (items without tags are left out)."""
        if not ids:
            return {}
        rows = self._run("reading tags", lambda conn: conn.execute(self._sql(
            "SELECT id, label, score FROM {tags} WHERE id = ANY(%s) ORDER BY score DESC, label"),
            ([int(i) for i in ids],)).fetchall())
        found: dict[int, list[tuple[str, float]]] = {}
        for id, label, score in rows:
            found.setdefault(id, []).append((label, float(score)))
        return found

    float32_bytes = 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()
