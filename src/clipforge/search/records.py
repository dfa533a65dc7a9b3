"""What a search index holds and answers, whichever store keeps it: an item's metadata, one hit, and the
filters a search applies in the store."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime

FRAME_PREFIX = "t="  # a video frame's item key: t=SECONDS


def frame_key(seconds: float) -> str:
    return f"{FRAME_PREFIX}{seconds:.3f}"


def frame_time(key: str | None) -> float | None:
    """The time in its video of a frame's item key, or None for an image's."""
    return float(key[len(FRAME_PREFIX):]) if key and key.startswith(FRAME_PREFIX) else None


@dataclass(frozen=True)
class SearchResult:
    """One hit: the item's id, cosine similarity to the query, where its image is, caption and size."""

    id: int
    score: float
    path: str
    caption: str | None
    width: int
    height: int
    captured: str | None = None  # ISO 8601 capture time (see Item)
    tags: tuple[str, ...] = ()   # labels ``clipforge tag`` gave the item, best first
    time: float | None = None    # a video frame's time in its video, in seconds (``path`` is then VIDEO@mm:ss)


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
    captured: str | None = None       # ISO 8601: EXIF DateTimeOriginal (with its offset when known), else mtime
    captured_from: str | None = None  # "exif" or "mtime"

    @property
    def time(self) -> float | None:
        """A video frame's time in its video, in seconds; None for an image."""
        return frame_time(self.key)

    @property
    def location(self) -> str:
        """The file path, ``shard.tar:key`` for an image inside a shard, ``video.mp4@mm:ss`` for a frame."""
        if self.time is not None:
            from clipforge.data.video import format_timestamp
            return f"{self.path}@{format_timestamp(self.time)}"
        return f"{self.path}:{self.key}" if self.key else self.path


@dataclass(frozen=True)
class Filters:
    """What a search keeps: items whose path starts with ``folder`` (a folder; made absolute unless it
    ends with a separator, which keeps a raw prefix), captured at or after ``after`` and before ``before``
    (``wall_clock`` forms: the local time where the photo was taken), whose caption contains ``caption``
    (ignoring ASCII case), and that carry every label of ``tags`` (``clipforge tag``)."""

    folder: str | None = None
    after: str | None = None
    before: str | None = None
    caption: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def of(cls, folder=None, after=None, before=None, caption=None, tags=()) -> "Filters":
        """Filters from what a user typed: dates or date-times checked and normalised, empty caption refused."""
        if caption is not None and not str(caption).strip():
            raise ValueError("the caption filter is empty: give the text captions must contain, or leave it out")
        after, before = wall_clock(after, "after"), wall_clock(before, "before")
        if after is not None and before is not None and after >= before:
            raise ValueError(f"after ({after}) is not earlier than before ({before}): no photo can match")
        return cls(folder, after, before, caption, tuple(tags))

    @property
    def prefix(self) -> str | None:
        if self.folder is None:
            return None
        folder = str(self.folder)
        return folder if folder.endswith(("/", os.sep)) else os.path.abspath(folder)

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.folder, self.after, self.before, self.caption)) or bool(self.tags)

    def sql(self, dialect: str, tags_table: str = "tags") -> tuple[list[str], list]:
        """The filters as SQL conditions on an items table, with their parameters (every value a parameter,
        never SQL text): ``dialect`` "sqlite" (``?``) or "postgresql" (``%s``; ``tags_table`` may be a
        ``psycopg.sql`` placeholder such as ``{tags}``). The same conditions in both stores."""
        mark, contains = ("?", "instr(lower(caption), lower(?)) > 0") if dialect == "sqlite" else \
            ("%s", "strpos(lower(caption), lower(%s)) > 0")
        conditions, params = [], []
        if self.folder is not None:
            conditions.append(f"substr(path, 1, {mark}) = {mark}")
            params += [len(self.prefix), self.prefix]
        for value, operator in ((self.after, ">="), (self.before, "<")):
            if value is not None:  # the wall-clock time: the first 19 characters of the ISO 8601 capture time
                conditions.append(f"substr(captured, 1, 19) {operator} {mark}")
                params.append(value)
        if self.caption is not None:
            conditions.append(contains)
            params.append(self.caption)
        for label in self.tags:
            conditions.append(f"id IN (SELECT id FROM {tags_table} WHERE label = {mark})")
            params.append(label)
        return conditions, params


_WHEN = re.compile(r"^(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d))?)?$")


def wall_clock(text, name: str = "date") -> str | None:
    """A date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM[:SS]) as 'YYYY-MM-DDTHH:MM:SS', the form the
    first 19 characters of a stored capture time take; ValueError naming ``name`` otherwise."""
    if text is None:
        return None
    match = _WHEN.match(str(text).strip())
    try:
        if match is None:
            raise ValueError
        parts = [int(p) if p else 0 for p in match.groups()]
        return datetime(*parts).isoformat(timespec="seconds")
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM[:SS])") from None


def captured_from_exif_text(taken: str | None, mtime_ns: int) -> tuple[str, str]:
    """(captured, captured_from) from what an older index or an embeddings folder kept: the EXIF date text
    (its offset was not kept), else the file's mtime."""
    from clipforge.data.exif import mtime_capture, parse_exif_date
    when = parse_exif_date(taken)
    if when is not None:
        return captured_columns(when, "exif")
    return captured_columns(mtime_capture(mtime_ns).when, "mtime")


def captured_columns(when, source: str) -> tuple[str, str]:
    """(captured, captured_from) as the stores keep them: ISO 8601 (seconds, or microseconds when the
    camera gave sub-seconds) and "exif" or "mtime"."""
    return when.isoformat(), source
