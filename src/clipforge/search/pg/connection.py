"""Connecting to PostgreSQL: the extra's import, one clear error per failure (server down, no pgvector, lost
connection), and the vector type of the server's pgvector (``halfvec`` from 0.7, else ``vector``)."""
from __future__ import annotations

import contextlib

from clipforge.search.pg.url import Location

CONNECT_TIMEOUT_S = 10


def driver():
    """psycopg, or RuntimeError naming the extra."""
    try:
        import pgvector.psycopg  # noqa: F401
        import psycopg
    except ImportError as e:
        raise RuntimeError(f"a PostgreSQL index needs the postgres extra ({e.name} is missing): "
                           f"pip install 'clipforge[postgres]'") from None
    return psycopg


def connect(location: Location, create_extension: bool = False):
    """An autocommit connection with pgvector's types registered. ``create_extension``: create the vector
    extension if the database lacks it (a writer; needs the privilege)."""
    psycopg = driver()
    from pgvector.psycopg import register_vector
    options = {"autocommit": True}
    if "connect_timeout" not in location.conninfo:
        options["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        conn = psycopg.connect(location.conninfo, **options)
    except psycopg.Error as e:
        raise RuntimeError(f"cannot connect to PostgreSQL at {location.display}: {location.scrub(_first_line(e))}. "
                           f"Check that the server runs and the URL (or the PG* environment variables and "
                           f"~/.pgpass)") from None
    try:
        if extension_version(conn) is None:
            if create_extension:
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.Error as e:
                    raise RuntimeError(_no_extension(location, _first_line(e))) from None
            else:
                raise RuntimeError(_no_extension(location, "the extension is not created in this database"))
        register_vector(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _no_extension(location: Location, why: str) -> str:
    return (f"the database at {location.display} has no pgvector extension ({why}): install pgvector on the "
            f"server and run CREATE EXTENSION vector as its owner")


def extension_version(conn) -> tuple[int, ...] | None:
    found = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    return tuple(int(p) for p in found[0].split(".")[:3] if p.isdigit()) if found else None


def vector_type(conn) -> str:
    """``halfvec`` where the server's pgvector has it (0.7 and later): the folder store's float16 in half the
    space; else ``vector`` (float32, holding the same float16-rounded values)."""
    return "halfvec" if (extension_version(conn) or (0,)) >= (0, 7) else "vector"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextlib.contextmanager
def database_errors(location: Location, doing: str):
    """Turn a lost connection or a database error into one RuntimeError that says what was being done and
    that the run can be resumed (everything committed before it is kept)."""
    psycopg = driver()
    try:
        yield
    except psycopg.OperationalError as e:
        raise RuntimeError(f"lost the connection to PostgreSQL at {location.display} while {doing}: "
                           f"{location.scrub(_first_line(e))}. What was committed is kept; run the same command "
                           f"again to resume") from None
    except psycopg.Error as e:
        raise RuntimeError(f"PostgreSQL at {location.display} refused {doing}: {location.scrub(_first_line(e))}") \
            from None
