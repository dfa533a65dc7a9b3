"""Where an index lives: a folder (the default, embedded store), or a table in PostgreSQL with pgvector, named by
a ``postgresql://`` URL (``clipforge.search.pg``; the ``postgres`` extra, imported only when a URL is used)."""
from __future__ import annotations

import os

URL_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a PostgreSQL index rather than a folder."""
    return isinstance(location, str) and location.lower().startswith(URL_SCHEMES)


def open_store(location: str | os.PathLike, float32_mib: float = 0):
    """The read side of the index at ``location``: a ``FolderStore`` or a ``PostgresStore``."""
    if is_database_url(location):
        from clipforge.search.pg.store import PostgresStore
        return PostgresStore(str(location))
    from clipforge.search.folder import FolderStore
    return FolderStore(location, float32_mib)


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
