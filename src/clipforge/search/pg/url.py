"""A PostgreSQL index URL: the connection settings handed to libpq, the table, and a form safe to show.

libpq reads what the URL leaves out from the standard ``PG*`` environment variables and ``~/.pgpass``.
``table`` is clipforge's own parameter; the password (in the URL or ``password=``) never leaves this object
except to libpq."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

DEFAULT_TABLE = "clipforge"
_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")


@dataclass(frozen=True)
class Location:
    """``conninfo`` for libpq, the items ``table``, the URL without its password (``display``), and the
    password if the URL carried one (to scrub it from any message)."""

    conninfo: str
    table: str
    display: str
    password: str | None

    def scrub(self, text: str) -> str:
        """``text`` with the password replaced (a driver message may quote the connection string)."""
        return text.replace(self.password, "***") if self.password else text


def parse(url: str) -> Location:
    """Read a ``postgresql://`` URL; ValueError naming what is wrong (the password left out)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {_without_password(parts)}; write postgresql://USER@HOST/DB?table=NAME")
    params = parse_qsl(parts.query, keep_blank_values=True)
    table = [v for k, v in params if k == "table"]
    table = table[-1] if table else DEFAULT_TABLE
    if not _TABLE.match(table):
        raise ValueError(f"table={table!r} in {_without_password(parts)} is not a table name clipforge uses: "
                         f"lower-case letters, digits and _ (not first), at most 40 characters")
    password = parts.password or next((v for k, v in params if k == "password"), None)
    libpq = [(k, v) for k, v in params if k != "table"]
    query = urlencode(libpq)
    # not urlunsplit: it drops the "//" of a URL with no host (postgresql://?table=x: all from PG* variables)
    conninfo = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    return Location(conninfo, table, _without_password(parts), password or None)


def _without_password(parts) -> str:
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}@{host}"
    query = urlencode([(k, "***" if k == "password" else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="/*")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return _without_password(urlsplit(url))
