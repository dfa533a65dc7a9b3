"""The approximate index of a PostgreSQL store: pgvector's HNSW graph on the image vectors (inner product),
with ``hnsw.ef_search`` raised until recall@10 against exact search reaches the target on sampled queries;
the recall and ef_search are recorded in the configuration row, as the folder store records its IVF index."""
from __future__ import annotations

import numpy as np

from clipforge.search.approximate import AUTO_THRESHOLD, TARGET_RECALL, sample_queries
from clipforge.search.pg import schema

SAMPLED_QUERIES = 100
MAX_EF_SEARCH = 1000  # pgvector's upper bound
REMEASURE_CHANGE = 0.1  # re-measure the recall once the item count has moved this far from the measured one
M, EF_CONSTRUCTION = 16, 64  # pgvector's defaults


def refresh(conn, table: str, display: str, mode: str) -> dict | None:
    """Build the HNSW index (``mode`` "always", or "auto" above ``AUTO_THRESHOLD`` items) and tune it, or
    drop it for "never" (and for "auto" below the threshold); returns what the configuration records."""
    config = schema.read_config(conn, table, display)
    if config is None:
        return None
    items = conn.execute(schema.composed("SELECT count(*) FROM {items}", table)).fetchone()[0]
    wanted = items > 0 and (mode == "always" or (mode == "auto" and items >= AUTO_THRESHOLD))
    info = config.get("approximate")
    if not wanted:
        if info is not None or schema.exists(conn, schema.names(table)["hnsw"]):
            with schema.table_lock(conn, table), conn.transaction():
                conn.execute(schema.composed("DROP INDEX IF EXISTS {hnsw}", table))
                _record(conn, table, None)
        return None
    measured = info["items"] if info else 0
    if info is not None and schema.exists(conn, schema.names(table)["hnsw"]) \
            and abs(items - measured) <= REMEASURE_CHANGE * max(measured, 1):
        return info
    vector = config.get("vector_type", "vector")
    with schema.table_lock(conn, table), conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
        conn.execute(schema.composed(f"CREATE INDEX IF NOT EXISTS {{hnsw}} ON {{items}} USING hnsw "
                                     f"(embedding {vector}_ip_ops) WITH (m = {M}, ef_construction = "
                                     f"{EF_CONSTRUCTION})", table))
    info = tune(conn, table, vector, items)
    with conn.transaction():
        _record(conn, table, info)
    return info


def _record(conn, table: str, info: dict | None) -> None:
    config = conn.execute(schema.composed("SELECT config FROM {meta} FOR UPDATE", table)).fetchone()[0]
    schema.write_config(conn, table, {**config, "approximate": info})


def tune(conn, table: str, vector: str, items: int) -> dict:
    """Raise ef_search from pgvector's default (40) until recall@10 of the HNSW search against exact search
    in SQL reaches ``TARGET_RECALL`` on sampled queries."""
    sample = conn.execute(schema.composed("SELECT embedding FROM {items} ORDER BY md5(id::text) LIMIT %s", table),
                          (2 * SAMPLED_QUERIES,)).fetchall()
    stored = np.stack([np.asarray(_floats(r[0]), dtype=np.float32) for r in sample])
    queries = sample_queries(stored, SAMPLED_QUERIES)
    truth = [set(exact_top(conn, table, vector, q, 10)) for q in queries]
    ef, recall = 40, 0.0
    while True:
        found = [set(hnsw_top(conn, table, vector, q, 10, ef)) for q in queries]
        recall = float(np.mean([len(t & f) / max(1, min(10, len(t))) for t, f in zip(truth, found)]))
        if recall >= TARGET_RECALL or ef >= MAX_EF_SEARCH:
            break
        ef = min(MAX_EF_SEARCH, ef * 2)
    return {"kind": "pgvector HNSW (inner product)", "m": M, "ef_construction": EF_CONSTRUCTION, "ef_search": ef,
            "items": int(items), "recall@10": round(recall, 4), "recall_queries": SAMPLED_QUERIES}


def _floats(value) -> np.ndarray:
    return value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)


def query_param(vector: str, q: np.ndarray):
    if vector == "halfvec":
        from pgvector import HalfVector
        return HalfVector(np.asarray(q, dtype=np.float32))
    return np.asarray(q, dtype=np.float32)


def exact_top(conn, table: str, vector: str, q: np.ndarray, k: int) -> list[int]:
    with conn.transaction():
        conn.execute("SET LOCAL enable_indexscan = off")
        rows = conn.execute(schema.composed("SELECT id FROM {items} ORDER BY embedding <#> %s, id LIMIT %s", table),
                            (query_param(vector, q), k)).fetchall()
    return [r[0] for r in rows]


def hnsw_top(conn, table: str, vector: str, q: np.ndarray, k: int, ef: int) -> list[int]:
    with conn.transaction():
        conn.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
        rows = conn.execute(schema.composed("SELECT id FROM {items} ORDER BY embedding <#> %s LIMIT %s", table),
                            (query_param(vector, q), k)).fetchall()
    return [r[0] for r in rows]
