"""Building and updating an index: plan against what is stored, then encode batch by batch, each batch's
vectors flushed before the transaction that commits its rows; with torchrun, ranks share the encoding and
rank 0 writes, in the order one process would."""
from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipforge.data import DescribedImages, collate_described
from clipforge.encode import encode_images, encode_texts
from clipforge.runtime.distributed import DistEnv, barrier, gather_objects, init_distributed
from clipforge.search import approximate, store
from clipforge.search.model import load_model, model_identity, model_name
from clipforge.search.plan import Entry, Plan, hash_all, list_sources, resolve, resolve_sources, triage


@dataclass(frozen=True)
class BuildOptions:
    """How to index: images per batch, DataLoader workers (decoding + preprocessing; also the threads
    hashing files), folder globs to leave out, the pixel limit, draft JPEG decoding, a progress bar,
    starting over, and whether to build the approximate index ("auto", "always", "never")."""

    batch_size: int = 64
    workers: int = 2
    exclude: tuple[str, ...] = ()
    max_pixels: int | None = None
    fast_decode: bool = False
    progress: bool = True
    rebuild: bool = False
    approximate: str = "auto"


def build(folder: str | os.PathLike, sources, model: str, device: str | None, options: BuildOptions,
          random_init: bool = False) -> dict:
    """Create or incrementally update the index in ``folder`` with the model spec ``model`` (``random_init``:
    seed-0 random weights); returns the run's summary (rank 0's)."""
    folder, sources = Path(folder), resolve_sources(sources)
    env = init_distributed(device or "auto")
    network, preprocess = load_model(str(model), env.device, random_init)
    model_check = (_ModelCheck(folder, str(model), network, preprocess, options.rebuild, random_init)
                   if env.is_master else None)
    barrier(env)
    plan = _plan(folder, sources, options, env)
    summary = _run(folder, plan, network, preprocess, model_check, options, env)
    if env.is_master:
        approximate.refresh(folder, options.approximate)
    barrier(env)
    return summary


class _ModelCheck:
    """Rank 0's check that the index is this model's, settled before anything is written to it.

    The weights checksum (one core for a second or more on large models) is left for ``settle``, which
    runs once the data workers are decoding beside it, unless the index names another model: then it is
    computed at once, so that a wrong model is refused before the sources are listed.
    """

    def __init__(self, folder: Path, spec: str, network, preprocess, rebuild: bool, random_init: bool = False):
        self.folder, self._args = folder, (spec, network, preprocess, random_init)
        self.config = None if rebuild else store.read_config(folder)
        self.identity = None
        if self.config is None:
            _clear(folder)
            folder.mkdir(parents=True, exist_ok=True)
        elif self.config["model"] != model_name(spec, random_init):
            self.settle()

    def settle(self) -> dict:
        """Refuse another model's index (ValueError naming both), or write a new index's config."""
        if self.identity is None:
            self.identity = model_identity(*self._args)
            config, identity = self.config, self.identity
            if config is not None and config["weights_sha256"] != identity["weights_sha256"]:
                raise ValueError(f"the index in {self.folder} was built with model {config['model']} (weights "
                                 f"sha256 {config['weights_sha256'][:12]}), not {identity['model']} (sha256 "
                                 f"{identity['weights_sha256'][:12]}); use that model, or --rebuild to start over")
            if config is None:
                store.write_config(self.folder, {"format_version": store.FORMAT_VERSION,
                                                 "segment_rows": store.SEGMENT_ROWS, **identity})
        return self.identity


def _clear(folder: Path) -> None:
    """Remove this index's own files (and only those) from ``folder``."""
    if not folder.exists():
        return
    names = [store.CONFIG, store.DATABASE, store.DATABASE + "-wal", store.DATABASE + "-shm"]
    for path in folder.iterdir():
        if path.name in names or path.name.startswith(tuple(f"{k}-" for k in store.KINDS)) \
                or path.name.startswith("approximate"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _plan(folder: Path, sources: list[str], options: BuildOptions, env: DistEnv):
    """(Plan, problems) on rank 0; the entries to encode on every rank. Hashing is shared by the ranks."""
    plan = listing = candidates = None
    if env.is_master:
        with store.connect(folder) as db:
            listing = list_sources(sources, db, options.exclude)
            plan, candidates = triage(listing, db)
    candidates = gather_objects(candidates, env)[0]
    mine = hash_all(candidates[env.rank::env.world_size], max(1, options.workers))
    parts = gather_objects(mine, env)
    hashes = [parts[i % env.world_size][i // env.world_size] for i in range(len(candidates))]
    if env.is_master:
        with store.connect(folder) as db:
            plan = resolve(plan, candidates, hashes, db)
    encode = gather_objects(plan.encode if env.is_master else None, env)[0]
    return plan, listing, encode


def _run(folder: Path, planned, network, preprocess, model_check: _ModelCheck | None, options: BuildOptions,
         env: DistEnv) -> dict:
    plan, listing, encode = planned
    rounds = _encoded_rounds(encode, network, preprocess, options, env)  # the data workers start decoding
    writer = None
    if model_check is not None:
        writer = _Writer(folder, int(model_check.settle()["dim"]), network)
        writer.apply_plan(plan)
    bar = tqdm(total=len(encode), unit="files", desc="indexing", disable=not (options.progress and env.is_master),
               dynamic_ncols=True)
    for parts in rounds:
        if writer is not None:
            done = writer.store_encoded(encode, sum((p[0] for p in parts), []), sum((p[1] for p in parts), []))
            bar.update(done)
    bar.close()
    if writer is None:
        return {}
    writer.finish(listing)
    return writer.summary(plan, listing)


def _encoded_rounds(encode: list, network, preprocess, options: BuildOptions, env: DistEnv):
    """Per round, every rank's (good, bad): good = [(position, vector, caption vector, info)], bad =
    [(position, reason, message)]; a round is one batch per rank, positions index ``encode``. The data
    workers start on this call, not on the first round."""
    mine = list(range(env.rank, len(encode), env.world_size))
    draft = preprocess.config.image_size if options.fast_decode else None
    dataset = DescribedImages([encode[i][0].ref for i in mine], preprocess, options.max_pixels, draft)
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers,
                                         collate_fn=collate_described)
    batches = iter(loader) if mine else iter(())
    rounds = -(-len(encode) // (options.batch_size * env.world_size))
    return _rounds(batches, rounds, mine, encode, network, env)


def _rounds(batches, rounds: int, mine: list[int], encode: list, network, env: DistEnv):
    for _ in range(rounds):
        local, tensors, infos, bad = next(batches, ([], None, [], []))
        good = []
        if tensors is not None:
            vectors = encode_images(network, tensors, batch_size=len(tensors)).cpu().numpy().astype(np.float16)
            captions = _caption_vectors(network, [encode[mine[i]][0].caption for i in local])
            good = [(mine[i], vectors[j], captions[j], info) for j, (i, info) in enumerate(zip(local, infos))]
        bad = [(mine[i], reason, message) for i, reason, message in bad]
        yield gather_objects((good, bad), env)


def _caption_vectors(network, captions: list[str | None]) -> list[np.ndarray | None]:
    """Float16 caption vectors, None where there is no caption."""
    texts = [c for c in captions if c]
    if not texts:
        return [None] * len(captions)
    vectors = iter(encode_texts(network, texts).cpu().numpy().astype(np.float16))
    return [next(vectors) if c else None for c in captions]


class _Writer:
    """Rank 0's side: writes vectors, then commits the rows that point at them, one transaction a batch."""

    def __init__(self, folder: Path, dim: int, network):
        self.folder, self.network = folder, network
        self.db = store.connect(folder)
        self.segments = {kind: store.SegmentWriter(folder, kind, dim) for kind in store.KINDS}
        self.counts = Counter()
        self.skipped = Counter()
        self.existing = {(r[0], r[1]) for r in self.db.execute("SELECT path, key FROM items")}

    def apply_plan(self, plan: Plan) -> None:
        """Removals, metadata-only updates and read errors in one transaction; then copied vectors."""
        with self.db:
            self.db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in plan.removed])
            self.db.executemany("UPDATE items SET source = ?, size = ?, mtime_ns = ?, member = ?, offset = ? "
                                "WHERE id = ?", [(e.source, e.size, e.mtime_ns, e.member, e.offset, item["id"])
                                                 for e, _, item in plan.touched])
            self._record_bad([(entry, reason, message) for entry, reason, message in plan.bad])
        for start in range(0, len(plan.reused), 256):
            self._store_reused(plan.reused[start:start + 256])

    def _store_reused(self, chunk: list) -> None:
        images = store.open_segments(self.folder, "images", store.next_row(self.db, "images"))
        rows = [donor["row"] for _, _, donor in chunk]
        vectors = np.stack([images[r // store.SEGMENT_ROWS][r % store.SEGMENT_ROWS] for r in rows])
        captions = _caption_vectors(self.network, [entry.caption for entry, _, _ in chunk])
        records = [(entry, digest, (donor["width"], donor["height"], donor["taken"]), caption)
                   for (entry, digest, donor), caption in zip(chunk, captions)]
        self._commit(records, vectors)
        self.counts["reused"] += len(chunk)

    def store_encoded(self, encode: list, good: list, bad: list) -> int:
        """Commit one round: ``good`` sorted by position; returns how many entries it settled."""
        good.sort(key=lambda g: g[0])
        records = [(encode[p][0], encode[p][1], (info.width, info.height, info.taken), caption)
                   for p, _, caption, info in good]
        vectors = np.stack([g[1] for g in good]) if good else None
        bad_entries = [(encode[p][0], reason, message) for p, reason, message in sorted(bad)]
        self._commit(records, vectors, bad_entries)
        return len(good) + len(bad)

    def _commit(self, records: list, vectors: np.ndarray | None, bad: list = ()) -> None:
        first = store.next_row(self.db, "images")
        first_caption = store.next_row(self.db, "captions")
        caption_rows, captions = [], []
        for _, _, _, caption in records:
            caption_rows.append(first_caption + len(captions) if caption is not None else None)
            if caption is not None:
                captions.append(caption)
        if vectors is not None:
            self.segments["images"].write(first, vectors)
        if captions:
            self.segments["captions"].write(first_caption, np.stack(captions))
        with self.db:
            for offset, ((entry, digest, info, _), caption_row) in enumerate(zip(records, caption_rows)):
                self._upsert(entry, digest, info, first + offset, caption_row)
            self._record_bad(bad)
            self.db.execute("INSERT OR REPLACE INTO rows VALUES ('images', ?)", (first + len(records),))
            self.db.execute("INSERT OR REPLACE INTO rows VALUES ('captions', ?)", (first_caption + len(captions),))

    def _upsert(self, entry: Entry, digest: str, info: tuple, row: int, caption_row: int | None) -> None:
        key = (entry.path, entry.key)
        self.counts["updated" if key in self.existing else "indexed"] += 1
        self.existing.add(key)
        self.db.execute(
            "INSERT INTO items (source, path, key, member, offset, size, mtime_ns, hash, width, height, caption, "
            "taken, row, caption_row) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path, key) "
            "DO UPDATE SET source = excluded.source, member = excluded.member, offset = excluded.offset, "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, hash = excluded.hash, width = excluded.width, "
            "height = excluded.height, caption = excluded.caption, taken = excluded.taken, row = excluded.row, "
            "caption_row = excluded.caption_row",
            (entry.source, entry.path, entry.key, entry.member, entry.offset, entry.size, entry.mtime_ns, digest,
             info[0], info[1], entry.caption, info[2], row, caption_row))
        self.db.execute("DELETE FROM skipped WHERE path = ? AND key = ?", key)

    def _record_bad(self, bad) -> None:
        for entry, reason, message in bad:
            self.skipped[reason] += 1
            key = (entry.path, entry.key)
            if key in self.existing:  # its stored vector is of content the file no longer holds
                self.db.execute("DELETE FROM items WHERE path = ? AND key = ?", key)
                self.existing.discard(key)
                self.counts["removed"] += 1
            self.db.execute("INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?, ?, ?)",
                            (entry.path, entry.key, entry.size, entry.mtime_ns, reason, message))

    def finish(self, listing) -> None:
        """Record the shards now fully indexed, so that an unchanged shard is not read again."""
        shards = sorted({e.path for e in listing.entries if e.key})
        with self.db:
            for shard in shards:
                stat = os.stat(shard)
                self.db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?)",
                                (shard, stat.st_size, stat.st_mtime_ns))
        for writer in self.segments.values():
            writer.close()

    def summary(self, plan: Plan, listing) -> dict:
        skipped = Counter(listing.problems) + plan.skipped_again + self.skipped
        total = self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        self.db.close()
        return {"indexed": self.counts["indexed"], "updated": self.counts["updated"],
                "reused": self.counts["reused"], "unchanged": plan.unchanged + len(plan.touched),
                "removed": len(plan.removed) + self.counts["removed"], "skipped": dict(sorted(skipped.items())),
                "items": total}
