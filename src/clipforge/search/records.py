"""What a search index holds and answers, whichever store keeps it: an item's metadata, one hit, and the
filters a search applies in the store."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchResult:
    """One hit: the item's id, cosine similarity to the query, where its image is, caption and size."""

    id: int
    score: float
    path: str
    caption: str | None
    width: int
    height: int


@dataclass(frozen=True)
class Item:
    """Every metadata column of one indexed image (docs/search.md, "Index formats"). ``row`` and
    ``caption_row`` place its vectors in a folder index's segments; they are None in PostgreSQL, where the
    vectors are columns of the item's own row."""

    id: int
    source: str
    path: str
    key: str
    member: str | None
    offset: int | None
    size: int
    mtime_ns: int
    hash: str
    width: int
    height: int
    caption: str | None
    taken: str | None
    row: int | None
    caption_row: int | None

    @property
    def location(self) -> str:
        """The file path, or ``shard.tar:key`` for an image inside a shard."""
        return f"{self.path}:{self.key}" if self.key else self.path


@dataclass(frozen=True)
class Filters:
    """What a search keeps: items whose path starts with ``folder`` (a folder; made absolute unless it
    ends with a separator, which keeps a raw prefix)."""

    folder: str | None = None

    @property
    def prefix(self) -> str | None:
        if self.folder is None:
            return None
        folder = str(self.folder)
        return folder if folder.endswith(("/", os.sep)) else os.path.abspath(folder)

    def __bool__(self) -> bool:
        return self.folder is not None
