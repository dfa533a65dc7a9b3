"""CSV and TSV files with a header row: the one reader and the one column lookup every data source uses."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

TAB_SUFFIXES = (".tsv", ".tab")
IMAGE_COLUMNS = ("filepath", "image", "path", "filename")  # names readers accept for the image-path column


@dataclass
class Table:
    """A header and its rows; ``rows`` yields ``(line number, fields)``; a short row has fewer fields."""

    path: str
    separator: str
    header: list[str]
    lines: list[list[str]]

    def rows(self) -> Iterator[tuple[int, list[str]]]:
        return enumerate(self.lines, start=2)

    def column(self, candidates: str | Sequence[str], what: str, hint: str = "") -> int:
        """The index of the first of ``candidates`` in the header; ValueError naming the file otherwise."""
        candidates = [candidates] if isinstance(candidates, str) else list(candidates)
        for name in candidates:
            if name in self.header:
                return self.header.index(name)
        wanted = " or ".join(repr(c) for c in candidates)
        raise ValueError(f"{self.path} has no {what} column: no column {wanted} in the header (separator "
                         f"{self.separator!r}), which holds {self.header}." + (f" {hint}" if hint else ""))

    def values(self, index: int) -> list[str]:
        """Column ``index`` of every row, stripped ('' where a row is short)."""
        return [row[index].strip() if index < len(row) else "" for row in self.lines]


def read_table(path: str | os.PathLike, separator: str | None = None) -> Table:
    """Read a CSV/TSV with a header row. The separator is ``separator``, else a tab for ``.tsv``/``.tab``
    files or a header holding a tab, else a comma. UTF-8 (a byte-order mark is dropped); bytes that are
    not UTF-8 survive as lone surrogates, so a caption check can report them row by row."""
    path = str(path)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        first = f.readline()
        f.seek(0)
        if separator is None:
            separator = "\t" if Path(path).suffix.lower() in TAB_SUFFIXES or "\t" in first else ","
        reader = csv.reader(f, delimiter=separator)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty; expected a header row naming its columns")
        return Table(path, separator, [h.strip() for h in header], [row for row in reader])


def resolve_path(value: str, base: str | os.PathLike) -> str:
    """An image path from a table: absolute as given, relative to the table's folder ``base``."""
    path = Path(value)
    return str(path if path.is_absolute() else Path(base) / path)


def table_images(path: str | os.PathLike, separator: str | None = None,
                 caption_key: str = "caption") -> list[tuple[int, str, str | None]]:
    """(line number, image path, caption or None) of every row of a CSV/TSV, for indexing a photo list.

    The image column is any of ``IMAGE_COLUMNS``; the caption column is optional. Relative paths
    resolve against the table's folder; a row without an image path gives ``""``.
    """
    table = read_table(path, separator)
    image_column = table.column(IMAGE_COLUMNS, "image path")
    caption_column = table.header.index(caption_key) if caption_key in table.header else None
    base = os.path.dirname(os.path.abspath(str(path)))
    rows = []
    for line, fields in table.rows():
        value = fields[image_column].strip() if image_column < len(fields) else ""
        caption = fields[caption_column].strip() if caption_column is not None and caption_column < len(fields) else ""
        rows.append((line, resolve_path(value, base) if value else "", caption or None))
    return rows
