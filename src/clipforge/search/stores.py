"""Where an index lives: a folder (the default, embedded store), or a table in PostgreSQL with pgvector, named by
a ``postgresql://`` URL (``clipforge.search.pg``; the ``postgres`` extra, imported only when a URL is used)."""
from __future__ import annotations

import os

URL_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a PostgreSQL index rather than a folder."""
    return isinstance(location, str) and location.lower().startswith(URL_SCHEMES)


def open_store(location: str | os.PathLike, float32_mib: float = 0, nprobe: int | None = None):
    """The read side of the index at ``location``: a ``FolderStore`` or a ``PostgresStore``. ``nprobe``: the
    cells a folder's faiss index probes per query instead of the number its build tuned (a PostgreSQL index
    has none: ValueError)."""
    if nprobe is not None and nprobe < 1:
        raise ValueError(f"nprobe is a number of cells to probe, at least 1, got {nprobe}")
    if is_database_url(location):
        if nprobe is not None:
            raise ValueError("nprobe is for a folder index's faiss index; a PostgreSQL index's HNSW search is "
                             "tuned by its build (hnsw.ef_search, recorded in its configuration)")
        from clipforge.search.pg.store import PostgresStore
        return PostgresStore(str(location))
    from clipforge.search.folder import FolderStore
    return FolderStore(location, float32_mib, nprobe)


def build_target(location: str | os.PathLike):
    """The write side of the index at ``location`` (``clipforge.search.build.Target``)."""
    if is_database_url(location):
        from clipforge.search.pg.writer import PostgresTarget
        return PostgresTarget(str(location))
    from clipforge.search.folder_writer import FolderTarget
    return FolderTarget(location)


def read_index_config(location: str | os.PathLike) -> dict | None:
    """The model identity an index records, or None where there is no index yet."""
    target = build_target(location)
    try:
        return target.read_config()
    finally:
        target.close()
