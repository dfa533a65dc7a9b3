"""The PostgreSQL store: an index as tables in a PostgreSQL database with the pgvector extension, named by a
URL (``postgresql://user@host/db?table=photos``). Transactions replace the folder store's fsync protocol,
several indexers and services may use one table at once, and filters run in SQL. The ``postgres`` extra
(psycopg 3 and pgvector's Python package), imported only when a URL is used; the schema is in
docs/search.md, "Index formats"."""
