"""What an indexing run must do: list the sources' images, then sort them against the index into unchanged,
skipped-again, and candidates whose content hash decides between reusing a stored vector and encoding."""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from clipforge.data import (
    BadSample,
    ImageRef,
    expand_shards,
    is_video_name,
    list_images,
    read_image_bytes,
    shard_images,
    table_images,
)
from clipforge.data.sources import source_kind
from clipforge.search.records import FRAME_PREFIX, frame_key  # noqa: F401 (frame_key: the key of FRAME_PREFIX)


@dataclass(frozen=True)
class Entry:
    """One image a source names: a file (``key`` '') or a shard member, with its caption if any; or a video
    file (``video``), whose frames become items keyed ``t=SECONDS`` (``frame_key``)."""

    source: str
    path: str
    key: str
    size: int
    mtime_ns: int
    caption: str | None = None
    member: str | None = None
    offset: int | None = None
    video: bool = False

    @property
    def ref(self) -> str | ImageRef:
        return ImageRef(self.path, self.member, self.offset, self.size) if self.member else self.path

    @property
    def name(self) -> str:
        return f"{self.path}:{self.key}" if self.key else self.path


@dataclass
class Listing:
    """The images of every source, the shards whose stored items still hold, and problems by reason."""

    entries: list[Entry] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    kept_shards: set[str] = field(default_factory=set)
    problems: Counter = field(default_factory=Counter)


def list_sources(sources: list[str], catalog, exclude=()) -> Listing:
    """Every image of ``sources`` (folders, CSV/TSV files, shard specs), in source order; ``catalog`` (the
    store's ``Catalog``, or None for none) says which shards are indexed unchanged."""
    listing = Listing()
    for spec in sources:
        kind = _kind(spec)
        if kind == "folder":
            source = os.path.abspath(spec)
            listing.entries += _stat_entries(source, [(p, None) for p in list_images(source, exclude, videos=True)],
                                             listing)
        elif kind == "csv":
            source = os.path.abspath(spec)
            rows = table_images(source)
            listing.problems["missing_file"] += sum(1 for _, path, _ in rows if not path)
            listing.entries += _stat_entries(source, [(p, c) for _, p, c in rows if p], listing)
        elif kind == "shards":
            source = str(spec)
            for shard in expand_shards(spec):
                _list_shard(source, os.path.abspath(shard), catalog, listing)
        listing.sources.append(source)
    return listing


def _kind(spec: str) -> str:
    try:
        kind = source_kind(spec)
    except FileNotFoundError:
        kind = None
    if kind not in ("folder", "csv", "shards"):
        raise ValueError(f"cannot index {spec!r}: it is not an image folder, a CSV/TSV file (filepath and optional "
                         "caption columns) or WebDataset shards (a .tar file, a folder of them or a brace range)")
    return kind


def _stat_entries(source: str, files: list[tuple[str, str | None]], listing: Listing) -> list[Entry]:
    entries = []
    for path, caption in files:
        try:
            stat = os.stat(path)
        except OSError:
            listing.problems["missing_file"] += 1
            continue
        entries.append(Entry(source, os.path.abspath(path), "", stat.st_size, stat.st_mtime_ns, caption,
                             video=is_video_name(os.path.basename(path))))
    return entries


def _list_shard(source: str, shard: str, catalog, listing: Listing) -> None:
    try:
        stat = os.stat(shard)
    except OSError:
        listing.problems["unreadable_shard"] += 1
        return
    stored = catalog.shard_stat(shard) if catalog is not None else None
    if stored is not None and tuple(stored) == (stat.st_size, stat.st_mtime_ns):
        listing.kept_shards.add(shard)
        return
    try:
        images, imageless = shard_images(shard)
    except BadSample as bad:
        listing.problems[bad.reason] += 1
        listing.kept_shards.add(shard)  # keep what was indexed from it rather than drop it
        return
    listing.problems["missing_image"] += len(imageless)
    listing.entries += [Entry(source, shard, s.key, s.member.size, stat.st_mtime_ns, s.caption, s.member.name,
                              s.member.offset) for s in images]


def _digest(data: bytes = b""):
    return hashlib.blake2b(data, digest_size=16)


def content_digest(data: bytes) -> str:
    """The content hash an index (and an embeddings folder) records: BLAKE2b-128 of the encoded bytes, hex."""
    return _digest(data).hexdigest()


def content_hash(entry: Entry) -> str | tuple[str, str]:
    """BLAKE2b-128 (hex) of the entry's encoded bytes, or (reason, message) if they cannot be read. A video
    is read in pieces: it may be larger than memory."""
    try:
        if entry.video:
            try:
                with open(entry.path, "rb") as f:
                    return hashlib.file_digest(f, _digest).hexdigest()
            except OSError as e:
                return "unreadable_file", f"cannot read video {entry.path}: {e.strerror or e}"
        return content_digest(read_image_bytes(entry.ref))
    except BadSample as e:
        return e.reason, str(e)


def hash_all(entries: list[Entry], threads: int) -> list:
    """``content_hash`` of each entry, read by ``threads`` threads (hashing releases the GIL)."""
    if threads <= 1 or len(entries) < 2:
        return [content_hash(e) for e in entries]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(content_hash, entries, chunksize=64))


# skip reasons tried again on every run although the file did not change: what was missing may be installed now
RETRIED = ("missing_extra",)


@dataclass
class Plan:
    """The run's work: removals, metadata-only updates, vectors to copy, images to encode."""

    removed: list[int] = field(default_factory=list)
    touched: list[tuple[Entry, str, Mapping]] = field(default_factory=list)   # same content, new stat
    reused: list[tuple[Entry, str, Mapping]] = field(default_factory=list)    # (entry, hash, donor item)
    encode: list[tuple[Entry, str]] = field(default_factory=list)
    bad: list[tuple[Entry, str, str]] = field(default_factory=list)              # (entry, reason, message)
    unchanged: int = 0
    skipped_again: Counter = field(default_factory=Counter)
    frames: dict[str, list] = field(default_factory=dict, repr=False)  # stored frames of each video, by path


def triage(listing: Listing, catalog) -> tuple[Plan, list[Entry]]:
    """Sort the listing against the index: (plan so far, candidates whose content must be hashed)."""
    plan, candidates, seen = Plan(), [], set()
    stored = {(r["path"], r["key"]): r for r in catalog.items()}
    skipped = {(r["path"], r["key"]): r for r in catalog.skipped()}
    frames = plan.frames
    for (path, key), item in stored.items():
        if key.startswith(FRAME_PREFIX):
            frames.setdefault(path, []).append(item)
    for entry in listing.entries:
        if (entry.path, entry.key) in seen:
            continue
        seen.add((entry.path, entry.key))
        if entry.video and entry.path in frames:
            mine = frames[entry.path]
            if all((f["size"], f["mtime_ns"], f["source"]) == (entry.size, entry.mtime_ns, entry.source) for f in mine):
                plan.unchanged += len(mine)
                seen.update((entry.path, f["key"]) for f in mine)
                continue
        item, bad = stored.get((entry.path, entry.key)), skipped.get((entry.path, entry.key))
        if item is not None and (item["size"], item["mtime_ns"], item["caption"]) == (
                entry.size, entry.mtime_ns, entry.caption) and item["source"] == entry.source:
            plan.unchanged += 1
        elif item is None and bad is not None and (bad["size"], bad["mtime_ns"]) == (entry.size, entry.mtime_ns) \
                and bad["reason"] not in RETRIED:
            plan.skipped_again[bad["reason"]] += 1
        else:
            candidates.append(entry)
    ours = set(listing.sources)
    for key, item in stored.items():
        if item["source"] in ours and key not in seen:
            if item["path"] in listing.kept_shards:
                plan.unchanged += 1
            else:
                plan.removed.append(item["id"])
    return plan, candidates


def resolve(plan: Plan, candidates: list[Entry], hashes: list, catalog) -> Plan:
    """Complete ``plan`` with the candidates' content hashes (or read errors)."""
    for entry, digest in zip(candidates, hashes):
        if isinstance(digest, tuple):
            plan.bad.append((entry, *digest))
            continue
        if entry.video:
            mine = plan.frames.get(entry.path, [])
            if mine and all(frame["hash"] == digest for frame in mine):  # the same video, only its stat changed
                plan.touched += [(entry, digest, frame) for frame in mine]
                kept = {frame["id"] for frame in mine}  # triage planned to remove them with the video's old stat
                plan.removed = [item_id for item_id in plan.removed if item_id not in kept]
            else:  # its frames are encoded again: a video's vectors are not copied between paths
                plan.encode.append((entry, digest))
            continue
        item = catalog.item_at(entry.path, entry.key)
        if item is not None and item["hash"] == digest and item["caption"] == entry.caption:
            plan.touched.append((entry, digest, item))
            continue
        donor = catalog.first_with_hash(digest)
        if donor is not None:  # the writer copies its vector (a store says what it does if the donor is gone)
            plan.reused.append((entry, digest, donor))
        else:
            plan.encode.append((entry, digest))
    return plan


def resolve_sources(sources) -> list[str]:
    """Sources as strings; a single string or path is one source."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    if not sources:
        raise ValueError("no sources to index: give image folders, CSV/TSV files or WebDataset shards")
    for s in sources:
        if "{" not in s and not Path(s).exists():
            raise FileNotFoundError(f"source {s!r} does not exist (an image folder, CSV/TSV file or .tar shards)")
    return sources
