"""WebDataset tar shards: expanding a shard spec into paths, and reading a shard's members by sample key.

A sample is the group of members sharing a key: the member path up to the first dot of its file name
(``dir/000123.jpg`` and ``dir/000123.txt`` are sample ``dir/000123``), as WebDataset and img2dataset group them.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from clipforge.data.images import IMAGE_EXTENSIONS
from clipforge.data.samples import BadSample

SHARD_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # a sample's image member, by preference
REMOTE = re.compile(r"^[a-z][a-z0-9+.-]+:", re.IGNORECASE)  # pipe:, http://, s3:// ... (not C:\)
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


@dataclass(frozen=True)
class Member:
    """Where one member's bytes lie inside its tar file."""

    name: str
    offset: int
    size: int


def expand_braces(spec: str) -> list[str]:
    """Every string a brace pattern names: ``{000..099}`` (zero-padded to the first bound's width) and
    ``{a,b,c}`` alternatives, any number of groups, left to right."""
    match = _BRACES.search(spec)
    if match is None:
        return [spec]
    head, body, tail = spec[:match.start()], match.group(1), spec[match.end():]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        step = 1 if int(last) >= int(first) else -1
        choices = [str(i).zfill(len(first)) for i in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """Shard paths or URLs of ``spec``: a ``.tar`` file, a folder of ``.tar`` files (sorted), or a brace
    pattern (``shards/{00000..00127}.tar``, ``{a,b}.tar``)."""
    text = str(spec)
    if os.path.isdir(text):
        urls = sorted(str(p) for p in Path(text).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in folder {text}")
        return urls
    return expand_braces(text)


def missing_shards(urls: list[str]) -> list[str]:
    """The local shards of ``urls`` that are not files (remote URLs are not checked)."""
    return [u for u in urls if not REMOTE.match(u) and not os.path.isfile(u)]


def sample_key(member_name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, or None for a member that belongs to no sample."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, ext = name.partition(".")
    if not dot or not stem or stem.startswith("__"):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_tar(path: str | os.PathLike) -> dict[str, dict[str, Member]]:
    """The samples of a local tar file from its headers alone: key -> extension -> ``Member``.

    Raises ``tarfile.TarError`` or ``OSError`` for a shard that cannot be read from the start; a
    damaged tail ends the scan with the samples read so far.
    """
    samples: dict[str, dict[str, Member]] = {}
    with tarfile.open(path, "r:") as tar:
        try:
            for info in tar:
                found = sample_key(info.name) if info.isreg() else None
                if found:
                    samples.setdefault(found[0], {})[found[1]] = Member(info.name, info.offset_data, info.size)
        except (tarfile.TarError, OSError):
            pass
    return samples


def shard_size(url: str, listed: dict) -> int | None:
    """Samples in one shard: from ``sizes.json`` beside it (shard name -> count, OpenCLIP's convention),
    img2dataset's ``*_stats.json``, or its tar headers; None for a remote shard. ``listed`` caches each
    folder's ``sizes.json`` between calls."""
    if REMOTE.match(url):
        return None
    folder, name = os.path.split(url)
    if folder not in listed:
        sizes_path = os.path.join(folder, "sizes.json")
        listed[folder] = json.loads(Path(sizes_path).read_text()) if os.path.isfile(sizes_path) else {}
    if name in listed[folder]:
        return int(listed[folder][name])
    stats_file = os.path.splitext(url)[0] + "_stats.json"
    if os.path.isfile(stats_file):
        return int(json.loads(Path(stats_file).read_text())["successes"])
    try:
        return len(scan_tar(url))
    except (tarfile.TarError, OSError):
        return 0


@dataclass(frozen=True)
class ShardImage:
    """One sample's image member in a shard, with the sample's caption (its ``txt`` member) if any."""

    key: str
    member: Member
    caption: str | None


def shard_images(path: str | os.PathLike) -> tuple[list[ShardImage], list[str]]:
    """(the image samples of a local shard in tar order, the keys of samples with no image member).

    A caption that is not UTF-8 or is blank counts as none. A shard that cannot be read from the start
    raises ``clipforge.data.samples.BadSample`` (``unreadable_shard``).
    """
    images, imageless = [], []
    try:
        samples = scan_tar(path)
    except (tarfile.TarError, OSError) as e:
        raise BadSample("unreadable_shard", f"cannot read shard {path}: {e}") from None
    with open(path, "rb") as f:
        for key, members in samples.items():
            ext = next((e for e in SHARD_IMAGE_KEYS if e in members), None)
            if ext is None:
                imageless.append(key)
                continue
            caption = None
            if "txt" in members:
                f.seek(members["txt"].offset)
                try:
                    caption = f.read(members["txt"].size).decode("utf-8").strip() or None
                except UnicodeDecodeError:
                    caption = None
            images.append(ShardImage(key, members[ext], caption))
    return images, imageless
