"""Building and updating an index, whichever store keeps it: plan against what is stored, then encode batch
by batch and hand each batch to the store's writer, which commits it whole or not at all; with torchrun,
ranks share the encoding and rank 0 writes, in the order one process would.

A store is a ``Target`` (``clipforge.search.folder_writer``, ``clipforge.search.pg``): its configuration (the
model identity), a ``Catalog`` that planning reads, a ``Writer`` and its approximate index."""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, replace
from typing import ContextManager, Iterable, Mapping, Protocol

import numpy as np
import torch
from tqdm import tqdm

from clipforge.data import (
    BadSample,
    DescribedImages,
    capture_time,
    collate_described,
    video_capture_time,
    video_frames,
    video_info,
)
from clipforge.data.exif import mtime_capture
from clipforge.encode import encode_captions, encode_images
from clipforge.runtime.distributed import DistEnv, barrier, gather_objects, init_distributed
from clipforge.search.approximate import check_mode
from clipforge.search.model import indexed_precision, load_model, model_identity, model_name
from clipforge.search.plan import Entry, Plan, frame_key, hash_all, list_sources, resolve, resolve_sources, triage
from clipforge.search.records import captured_columns


@dataclass(frozen=True)
class BuildOptions:
    """How to index: images per batch, DataLoader workers (decoding + preprocessing; also the threads
    hashing files), folder globs to leave out, the pixel limit, draft JPEG decoding, a progress bar,
    starting over, which approximate index to build ("auto", "always", "never", "ivfpq") and the bytes it may
    take (``clipforge.search.approximate.choose``; None: no limit)."""

    batch_size: int = 64
    workers: int = 2
    exclude: tuple[str, ...] = ()
    max_pixels: int | None = None
    fast_decode: bool = False
    progress: bool = True
    rebuild: bool = False
    approximate: str = "auto"
    max_index_memory: int | None = None
    video_every: float | None = 5.0  # a video frame every this many seconds (None: none)...
    video_scenes: bool = True        # ...plus one at each scene change (clipforge.data.video_frames)


class Catalog(Protocol):
    """What planning reads of a store: its items and skipped files as mappings of their columns."""

    def shard_stat(self, path: str) -> tuple[int, int] | None: ...
    def items(self) -> Iterable[Mapping]: ...
    def skipped(self) -> Iterable[Mapping]: ...
    def item_at(self, path: str, key: str) -> Mapping | None: ...
    def first_with_hash(self, digest: str) -> Mapping | None: ...
    def shards(self) -> Iterable[Mapping]: ...


class Importer(Protocol):
    """Writes items with their ids and vectors as another index holds them (``clipforge.search.transfer``)."""

    def add(self, items: list, vectors: np.ndarray, captions: dict[int, np.ndarray]) -> None: ...
    def add_skipped(self, rows: list[Mapping]) -> None: ...
    def add_shards(self, rows: list[Mapping]) -> None: ...
    def close(self) -> None: ...


class Target(Protocol):
    """A store as an indexing run writes it."""

    location: str  # what messages call it (a URL without its password)

    def prepare(self, rebuild: bool) -> None: ...
    def read_config(self) -> dict | None: ...
    def create(self, config: dict) -> dict: ...
    def catalog(self) -> ContextManager[Catalog]: ...
    def lock_sources(self, sources: list[str]) -> ContextManager: ...
    def writer(self, dim: int, network) -> "Writer": ...
    def importer(self) -> Importer: ...
    def refresh_approximate(self, mode: str, max_index_memory: int | None = None,
                            progress: bool = True) -> dict | None: ...
    def close(self) -> None: ...


def build(target: Target, sources, model: str, device: str | None, options: BuildOptions,
          random_init: bool = False, precision: str | None = None) -> dict:
    """Create or incrementally update the index ``target`` with the model spec ``model`` (``random_init``:
    seed-0 random weights) in ``precision`` ("fp32" or "int8"; None: the existing index's, else "fp32");
    returns the run's summary (rank 0's)."""
    sources = resolve_sources(sources)
    check_mode(options.approximate)
    env = init_distributed(device or "auto")
    if precision is None:
        config = None if options.rebuild else target.read_config()
        precision = indexed_precision(config or {})
    network, preprocess = load_model(str(model), env.device, random_init, precision)
    try:
        with (target.lock_sources(sources) if env.is_master else contextlib.nullcontext()):
            model_check = (_ModelCheck(target, str(model), network, preprocess, options.rebuild, random_init,
                                       precision) if env.is_master else None)
            barrier(env)
            plan = _plan(target, sources, options, env)
            summary = _run(target, plan, network, preprocess, model_check, options, env)
        if env.is_master:
            compacted = target.compact()
            if compacted is not None:
                summary["compacted"] = compacted
            target.refresh_approximate(options.approximate, options.max_index_memory, options.progress)
    finally:
        target.close()
    barrier(env)
    return summary


class _ModelCheck:
    """Rank 0's check that the index is this model's, settled before anything is written to it.

    The weights checksum (one core for a second or more on large models) is left for ``settle``, which
    runs once the data workers are decoding beside it, unless the index names another model: then it is
    computed at once, so that a wrong model is refused before the sources are listed.
    """

    def __init__(self, target: Target, spec: str, network, preprocess, rebuild: bool, random_init: bool = False,
                 precision: str = "fp32"):
        self.target, self._args = target, (spec, network, preprocess, random_init)
        target.prepare(rebuild)
        self.config = target.read_config()
        self.identity = None
        if self.config is not None and (self.config["model"] != model_name(spec, random_init)
                                        or indexed_precision(self.config) != precision):
            self.settle()

    def settle(self) -> dict:
        """Refuse another model's index (ValueError naming both), or record a new index's model identity."""
        if self.identity is None:
            identity = model_identity(*self._args)
            config = self.config if self.config is not None else self.target.create(identity)
            if config["weights_sha256"] != identity["weights_sha256"]:
                raise ValueError(f"the index in {self.target.location} was built with model {config['model']} "
                                 f"(weights sha256 {config['weights_sha256'][:12]}), not {identity['model']} "
                                 f"(sha256 {identity['weights_sha256'][:12]}); use that model, or --rebuild to "
                                 f"start over")
            if indexed_precision(config) != indexed_precision(identity):
                raise ValueError(f"the index in {self.target.location} holds vectors encoded in "
                                 f"{indexed_precision(config)}, and this run encodes in "
                                 f"{indexed_precision(identity)}: vectors of both in one index would rank slightly "
                                 f"differently. Leave --precision out (or pass --precision "
                                 f"{indexed_precision(config)}) to add to it, or --rebuild to start over in "
                                 f"{indexed_precision(identity)}")
            self.identity = identity
        return self.identity


def _plan(target: Target, sources: list[str], options: BuildOptions, env: DistEnv):
    """(Plan, listing, entries to encode) on rank 0; the entries to encode on every rank. Hashing is shared
    by the ranks."""
    plan = listing = candidates = None
    if env.is_master:
        with target.catalog() as catalog:
            listing = list_sources(sources, catalog, options.exclude)
            plan, candidates = triage(listing, catalog)
    candidates = gather_objects(candidates, env)[0]
    mine = hash_all(candidates[env.rank::env.world_size], max(1, options.workers))
    parts = gather_objects(mine, env)
    hashes = [parts[i % env.world_size][i // env.world_size] for i in range(len(candidates))]
    if env.is_master:
        with target.catalog() as catalog:
            plan = resolve(plan, candidates, hashes, catalog)
    if env.is_master:  # videos are read by rank 0 after the images (one video is many frames, decoded in order)
        plan.videos = [e for e in plan.encode if e[0].video]
        plan.encode = [e for e in plan.encode if not e[0].video]
    encode = gather_objects(plan.encode if env.is_master else None, env)[0]
    return plan, listing, encode


def _run(target: Target, planned, network, preprocess, model_check: _ModelCheck | None, options: BuildOptions,
         env: DistEnv) -> dict:
    plan, listing, encode = planned
    rounds = _encoded_rounds(encode, network, preprocess, options, env)  # the data workers start decoding
    writer = None
    if model_check is not None:
        writer = target.writer(int(model_check.settle()["dim"]), network)
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
    with writer:
        return _finish(writer, plan, listing, network, preprocess, options, env)


def _finish(writer: "Writer", plan: Plan, listing, network, preprocess, options: BuildOptions, env: DistEnv) -> dict:
    for entry, digest in getattr(plan, "videos", []):
        _store_video(writer, entry, digest, network, preprocess, options)
    if writer.orphans:  # reused vectors whose donor another writer removed meanwhile: encode them here
        orphans, writer.orphans = writer.orphans, []
        alone = DistEnv(rank=0, local_rank=0, world_size=1, device=env.device, initialized=False)
        for parts in _encoded_rounds(orphans, network, preprocess, options, alone):
            writer.store_encoded(orphans, *parts[0])
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
            captions = caption_rows(network, [encode[mine[i]][0].caption for i in local])
            good = [(mine[i], vectors[j], captions[j], info) for j, (i, info) in enumerate(zip(local, infos))]
        bad = [(mine[i], reason, message) for i, reason, message in bad]
        yield gather_objects((good, bad), env)


def _store_video(writer: "Writer", entry: Entry, digest: str, network, preprocess, options: BuildOptions) -> None:
    """A video's frames (every ``video_every`` seconds and at scene changes), encoded and committed in one
    step: an item per frame, keyed by its time. Frames read before a decoding error are kept; a video that
    gives none is skipped by reason, like a bad image."""
    frames, error = [], None
    try:
        for frame in video_frames(entry.path, every_s=options.video_every, scenes=options.video_scenes,
                                  max_pixels=options.max_pixels, draft_size=preprocess.config.image_size):
            frames.append(frame)
    except BadSample as bad:
        error = bad
    if not frames:
        writer._commit([], None, [(entry, error.reason, str(error))] if error else [])
        return
    try:
        info = video_info(entry.path)
        size, when = (info.width, info.height), video_capture_time(info, entry.mtime_ns)
    except BadSample:  # frames were read: keep them, dated by the file
        size, when = frames[0].image.size, mtime_capture(entry.mtime_ns)
    captured = captured_columns(when.when, when.source)
    tensors = torch.stack([preprocess(frame.image) for frame in frames])
    vectors = encode_images(network, tensors, batch_size=options.batch_size).cpu().numpy().astype(np.float16)
    records = [(replace(entry, key=frame_key(frame.time)), digest, (*size, None, *captured), None)
               for frame in frames]
    writer._commit(records, vectors)


def caption_rows(network, captions: list[str | None]) -> list[np.ndarray | None]:
    """Caption vectors as the index stores them (float16), None where there is no caption."""
    vectors = encode_captions(network, captions, int(network.config.embed_dim)).numpy().astype(np.float16)
    return [vector if caption else None for vector, caption in zip(vectors, captions)]


def described(info, entry: Entry) -> tuple:
    """(width, height, taken, captured, captured_from) of a decoded image: its EXIF capture time, else its
    file's mtime (``clipforge.data.capture_time``)."""
    when = capture_time(info, entry.mtime_ns)
    return (info.width, info.height, info.taken, *captured_columns(when.when, when.source))


def reused(donor: Mapping, entry: Entry) -> tuple:
    """What a reused vector's item takes from its donor (same content, so the same size and EXIF date); an
    mtime capture time is this file's own."""
    if donor["captured_from"] == "exif":
        return (donor["width"], donor["height"], donor["taken"], donor["captured"], "exif")
    return (donor["width"], donor["height"], donor["taken"],
            *captured_columns(mtime_capture(entry.mtime_ns).when, "mtime"))


def touched(item: Mapping, entry: Entry) -> tuple[str, str]:
    """(captured, captured_from) of an item whose file changed its mtime but not its content: a capture time
    from the content (EXIF, a video's creation time) stays; an mtime capture time follows the file."""
    if item["captured_from"] in ("exif", "video"):
        return item["captured"], item["captured_from"]
    return captured_columns(mtime_capture(entry.mtime_ns).when, "mtime")


class Writer:
    """Rank 0's side of a run: a store's writer commits each batch (its items, vectors and skipped files)
    in one step that a crash either completes or undoes. Stores implement ``apply_plan``, ``_commit``,
    ``finish`` and ``_count``; this class keeps the run's counts and summary.

    A record is (entry, content hash, (width, height, taken, captured, captured_from), caption vector or
    None); vectors are float16, one row per record."""

    def __init__(self, network):
        self.network = network
        self.counts = Counter()
        self.skipped = Counter()
        self.orphans: list[tuple[Entry, str]] = []  # (entry, hash) whose donor vanished before its copy

    def apply_plan(self, plan: Plan) -> None:
        raise NotImplementedError

    def _commit(self, records: list, vectors: np.ndarray | None, bad: list = ()) -> None:
        raise NotImplementedError

    def finish(self, listing) -> None:
        raise NotImplementedError

    def _count(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def store_encoded(self, encode: list, good: list, bad: list) -> int:
        """Commit one round: ``good`` sorted by position; returns how many entries it settled."""
        good.sort(key=lambda g: g[0])
        records = [(encode[p][0], encode[p][1], described(info, encode[p][0]), caption)
                   for p, _, caption, info in good]
        vectors = np.stack([g[1] for g in good]) if good else None
        bad_entries = [(encode[p][0], reason, message) for p, reason, message in sorted(bad)]
        self._commit(records, vectors, bad_entries)
        return len(good) + len(bad)

    def summary(self, plan: Plan, listing) -> dict:
        skipped = Counter(listing.problems) + plan.skipped_again + self.skipped
        return {"indexed": self.counts["indexed"], "updated": self.counts["updated"],
                "reused": self.counts["reused"], "unchanged": plan.unchanged + len(plan.touched),
                "removed": len(plan.removed) + self.counts["removed"], "skipped": dict(sorted(skipped.items())),
                "items": self._count()}

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
