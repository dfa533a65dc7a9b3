"""The partitions of ``clipforge embed``: the sources cut into pieces that any worker produces on its own (each
folder's or table's images in ``partition_size`` pieces, one per shard), the folder's configuration and the
check that lets a rerun continue it, decoding with content hashes, and assembling one partition's output."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clipforge.data import DescribedImages, expand_shards, image_info, load_image, read_image_bytes
from clipforge.data.samples import BadSample
from clipforge.data.sources import source_kind
from clipforge.search import embeddings
from clipforge.search.embeddings import PartitionData
from clipforge.search.plan import Entry, content_digest, list_sources

# What must match for a rerun to continue a folder, and how the refusal names it.
_RESUME_KEYS = {"format": "format", "format_version": "format version", "model": "model",
                "weights_sha256": "model weights", "dtype": "--dtype", "decode": "--max-pixels or --fast-decode",
                "partition_size": "--partition-size", "text": "captions",
                "plan_sha256": "sources (other sources, or files added, removed or changed since)"}


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed: images per encoded batch, DataLoader workers decoding beside the encoding (local engine and
    torchrun), images per partition (for folders and tables; a shard is one partition), folder globs to leave
    out, the pixel limit, draft JPEG decoding, the stored float type, a progress bar, and starting over."""

    batch_size: int = 64
    workers: int = 2
    partition_size: int = 10_000
    exclude: tuple[str, ...] = ()
    max_pixels: int | None = None
    fast_decode: bool = False
    dtype: str = "float16"
    progress: bool = True
    rebuild: bool = False


@dataclass(frozen=True)
class Work:
    """One partition's work: the images of a folder or table (``entries``; the first partition of a source also
    carries the ``problems`` its listing found, such as a table's missing files), or a shard (``shard`` = (source
    spec, shard path)) that the worker lists itself, so that planning never opens a shard."""

    number: int
    entries: tuple[Entry, ...] = ()
    shard: tuple[str, str] | None = None
    problems: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"number": self.number, "entries": [asdict(e) for e in self.entries],
                           "shard": self.shard, "problems": self.problems})

    @classmethod
    def from_json(cls, text: str) -> "Work":
        d = json.loads(text)
        return cls(d["number"], tuple(Entry(**e) for e in d["entries"]), tuple(d["shard"]) if d["shard"] else None,
                   tuple((reason, count) for reason, count in d["problems"]))

    def listed(self) -> tuple[list[Entry], dict[str, int]]:
        """(images, problems counted by reason): a shard's samples with an image, under its source's spec."""
        if self.shard is None:
            return list(self.entries), dict(self.problems)
        spec, path = self.shard
        listing = list_sources([path], None)
        return [replace(e, source=spec) for e in listing.entries], {r: n for r, n in listing.problems.items() if n}

    def fingerprint(self) -> list:
        """What the partition is made of: each image's path, key, size, mtime and caption, or the shard's
        path, size and mtime."""
        if self.shard is not None:
            try:
                stat = os.stat(self.shard[1])
                return [self.shard[1], stat.st_size, stat.st_mtime_ns]
            except OSError:
                return [self.shard[1], None, None]
        return [[e.path, e.key, e.size, e.mtime_ns, e.caption] for e in self.entries]


def plan_partitions(sources: list[str], options: EmbedOptions) -> list[Work]:
    """The run's partitions, numbered in source order: each folder's or table's images (each once) cut into
    ``partition_size`` pieces, and one partition per shard."""
    works, seen = [], set()
    for spec in sources:
        try:
            kind = source_kind(spec)
        except FileNotFoundError:
            kind = None
        if kind == "shards":
            works += [Work(len(works) + i, shard=(spec, os.path.abspath(s))) for i, s in enumerate(expand_shards(spec))]
            continue
        listing, entries = list_sources([spec], None, options.exclude), []  # refuses a spec of no known kind
        for entry in listing.entries:
            if (entry.path, entry.key) not in seen:
                seen.add((entry.path, entry.key))
                entries.append(entry)
        problems = tuple(sorted((r, n) for r, n in listing.problems.items() if n))
        for start in range(0, max(len(entries), 1 if problems else 0), options.partition_size):
            works.append(Work(len(works), tuple(entries[start:start + options.partition_size]),
                              problems=() if start else problems))
    if not works:
        raise ValueError(f"no images in {', '.join(sources)}: nothing to embed")
    return works


def has_captions(works: list[Work]) -> bool:
    """Whether the folder gets caption vectors: any listed image has a caption, or, for shards, the first
    shard of a source has one (a WebDataset's shards are alike; listing them all would read every shard)."""
    if any(e.caption for w in works for e in w.entries):
        return True
    firsts = {w.shard[0]: w for w in reversed(works) if w.shard is not None}
    return any(e.caption for w in firsts.values() for e in w.listed()[0])


def folder_config(identity: dict, sources: list[str], works: list[Work], options: EmbedOptions) -> dict:
    """``embeddings.json``: the model (``clipforge.search.model.model_identity``, as an index records it), the
    preprocessing and decoding, the float type, and the plan the partitions follow."""
    plan = hashlib.sha256(json.dumps([w.fingerprint() for w in works]).encode()).hexdigest()
    return {"format": embeddings.FORMAT, "format_version": embeddings.FORMAT_VERSION, **identity,
            "dtype": options.dtype, "normalized": True,
            "decode": {"max_pixels": options.max_pixels, "fast_decode": options.fast_decode},
            "text": has_captions(works), "sources": sources, "exclude": list(options.exclude),
            "partition_size": options.partition_size, "partitions": len(works), "plan_sha256": plan}


def prepare_folder(folder: Path, config: dict, rebuild: bool) -> None:
    """Start a new folder or continue one written with the same model, options and sources (else ValueError
    saying what differs); ``rebuild`` discards the folder's embeddings first. Never touches others' files."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file; embeddings are written to a folder")
    if rebuild:
        embeddings.clear(folder)
    existing = embeddings.read_config(folder)
    if existing is None:
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"--output {folder} is not empty and holds no {embeddings.CONFIG}: it is not an "
                             "embeddings folder of clipforge, whose files would be written beside others; choose "
                             "a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        embeddings.write_config(folder, config)
        return
    check_same_run(folder, existing, config)
    embeddings.remove_temporaries(folder)


def check_same_run(folder: Path, existing: dict, config: dict) -> None:
    """ValueError naming what differs between ``folder``'s embeddings.json and this run's."""
    differ = [name for key, name in _RESUME_KEYS.items() if existing.get(key) != config.get(key)]
    if differ:
        raise ValueError(f"the embeddings in {folder} were written with other {'; '.join(differ)} (model "
                         f"{existing.get('model')}, {existing.get('partitions')} partitions) than this run has (model "
                         f"{config['model']}, {config['partitions']} partitions). A rerun continues a folder only "
                         "with the same model, options and unchanged sources: use --rebuild to start over, or "
                         "another --output")


class HashedImages(DescribedImages):
    """``DescribedImages`` whose info is (``ImageInfo``, BLAKE2b-128 hex of the encoded bytes): each file is
    read once, hashed as ``clipforge.search.plan.content_hash`` hashes it, and decoded from those bytes."""

    def __getitem__(self, i: int):
        ref = self.refs[i]
        try:
            data = read_image_bytes(ref)
            img = load_image(data, self.max_pixels, self.draft_size, name=str(ref))
            return i, self.preprocess(img), (image_info(img), content_digest(data)), None
        except BadSample as e:
            return i, None, None, (e.reason, str(e))
        except (OSError, ValueError) as e:  # preprocessing refusing a decoded image
            return i, None, None, ("unreadable_image", f"{ref}: {e}")


def metadata_row(entry: Entry, info, digest: str) -> dict:
    """One metadata row (``clipforge.search.embeddings.COLUMNS``)."""
    return {"image_path": entry.path, "key": entry.key, "member": entry.member, "offset": entry.offset,
            "size": entry.size, "mtime_ns": entry.mtime_ns, "source": entry.source, "caption": entry.caption,
            "width": info.width, "height": info.height, "taken": info.taken, "hash": digest}


def partition_data(number: int, listed: int, encoded: list, skipped: list, problems: dict, text: bool,
                   dtype: str, dim: int) -> PartitionData:
    """Assemble a partition from ``encoded`` = [(position, vector, caption vector, row)] in any order."""
    encoded = sorted(encoded, key=lambda e: e[0])
    vectors = np.stack([e[1] for e in encoded]) if encoded else np.zeros((0, dim))
    texts = np.stack([e[2] for e in encoded]) if encoded and text else None
    return PartitionData(number, listed, vectors.astype(dtype), None if texts is None else texts.astype(dtype),
                         [e[3] for e in encoded], sorted(skipped), problems)


class Progress:
    """A console bar of images with their rate and the time left. A shard's images are known only once it
    is listed, so with shards the total is estimated from the mean shard so far."""

    def __init__(self, works: list[Work], todo: list[Work], enabled: bool):
        self.known = sum(len(w.entries) for w in todo if w.shard is None)
        self.shards_left = sum(1 for w in todo if w.shard is not None)
        self.shard_images, self.shards_done, self.counted = 0, 0, set()
        self.bar = tqdm(total=None if self.shards_left else self.known, unit="img", desc="embedding",
                        disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.bar.set_postfix_str(f"partitions 0/{len(todo)}", refresh=False)
        self.partitions, self.next_poll = len(todo), 0.0

    def images(self, count: int) -> None:
        self.bar.update(count)

    def partition(self, work: Work, listed: int, images_counted: bool = True) -> None:
        """Partition ``work`` is written (``images_counted``: its images were already counted by ``images``)."""
        if work.number in self.counted:
            return
        self.counted.add(work.number)
        if not images_counted:
            self.bar.update(listed)
        if work.shard is not None:
            self.shard_images, self.shards_done, self.shards_left = (self.shard_images + listed,
                                                                     self.shards_done + 1, self.shards_left - 1)
            self.bar.total = self.known + self.shard_images + round(self.shard_images / self.shards_done
                                                                    * self.shards_left)
        self.bar.set_postfix_str(f"partitions {len(self.counted)}/{self.partitions}")

    def close(self) -> None:
        self.bar.close()


def summary(folder: Path, works: list[Work], already_done: int) -> dict:
    """The folder's totals from the partition records: partitions (embedded by this run, already complete),
    vectors, and images skipped by reason."""
    records = [embeddings.read_record(folder, w.number, len(works)) for w in works]
    missing = [w.number for w, r in zip(works, records) if r is None]
    if missing:
        raise RuntimeError(f"partitions {missing[:10]} of {folder} were not written; run the command again to "
                           "finish them")
    skipped = sum((Counter(r["skipped"]) for r in records), Counter())
    return {"partitions": len(works), "embedded": len(works) - already_done, "already_done": already_done,
            "vectors": sum(r["vectors"] for r in records), "skipped": dict(sorted(skipped.items())),
            "output": str(folder)}
