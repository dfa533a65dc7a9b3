"""An index from an embeddings folder (``clipforge embed``'s output, clip-retrieval's layout) without encoding:
the vectors and metadata as they are, into either store, after checking that the folder's model is the
index's. Each chunk commits through the store's own writer, so a crash loses at most the chunk in flight
and a rerun skips what is already stored."""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from clipforge.search import embeddings
from clipforge.search.approximate import check_mode
from clipforge.search.model import IDENTITY_KEYS, indexed_precision
from clipforge.search.plan import Entry
from clipforge.search.records import captured_from_exif_text
from clipforge.search.stores import build_target

CHUNK = 1024


def ingest(location: str | os.PathLike, folder: str | os.PathLike, rebuild: bool = False, approximate: str = "auto",
           progress: bool = True, max_index_memory: int | None = None) -> dict:
    """Add the complete partitions of the embeddings ``folder`` to the index at ``location`` (created if new);
    returns the summary (``indexed``, ``updated``, ``unchanged``, ``skipped``, ``items``, ``partitions``)."""
    config = embeddings.read_config(folder)
    if config is None or config.get("format") != embeddings.FORMAT:
        raise FileNotFoundError(f"{folder} holds no embeddings (no {embeddings.CONFIG}); write them with "
                                f"`clipforge embed SOURCE... --model MODEL --output {folder}`")
    check_mode(approximate)
    identity = {k: config[k] for k in IDENTITY_KEYS if k in config}
    done = sorted(embeddings.finished(folder, config["partitions"]))
    target = build_target(location)
    try:
        target.prepare(rebuild)
        stored = target.read_config()
        if stored is not None and stored["weights_sha256"] != identity["weights_sha256"]:
            raise ValueError(f"the index in {target.location} was built with model {stored['model']} (weights sha256 "
                             f"{stored['weights_sha256'][:12]}), not {identity['model']} (sha256 "
                             f"{identity['weights_sha256'][:12]}) that embedded {folder}; use another index, or "
                             f"--rebuild to start over")
        if stored is not None and indexed_precision(stored) != indexed_precision(identity):
            raise ValueError(f"the index in {target.location} holds vectors encoded in {indexed_precision(stored)}, "
                             f"and {folder} holds vectors encoded in {indexed_precision(identity)}: vectors of both "
                             f"in one index would rank slightly differently; use another index, or --rebuild to "
                             f"start over")
        if stored is None:
            target.create(identity)
        with target.catalog() as catalog:
            existing = {(r["path"], r["key"]): (r["hash"], r["caption"]) for r in catalog.items()}
        with target.writer(int(identity["dim"]), None) as writer:
            summary = _add_partitions(writer, folder, config, done, existing, progress)
        target.refresh_approximate(approximate, max_index_memory, progress)
        return summary
    finally:
        target.close()


def _add_partitions(writer, folder, config: dict, done: list[int], existing: dict, progress: bool) -> dict:
    unchanged, skipped = 0, {}
    bar = tqdm(total=len(done), unit="partitions", desc="ingesting", disable=not progress, dynamic_ncols=True)
    for number in done:
        files = embeddings.partition_files(folder, number, config["partitions"])
        for reason, count in embeddings.read_record(folder, number, config["partitions"])["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
        rows = embeddings.parquet().read_table(files[embeddings.METADATA]).to_pylist() \
            if files[embeddings.METADATA].exists() else []
        if not rows:
            bar.update(1)
            continue
        images = np.load(files[embeddings.IMAGES], mmap_mode="r")
        texts = np.load(files[embeddings.TEXTS], mmap_mode="r") if files[embeddings.TEXTS].exists() else None
        if len(images) != len(rows) or (texts is not None and len(texts) != len(rows)):
            raise ValueError(f"partition {number} of {folder} has {len(rows)} metadata rows but "
                             f"{len(images)} image vectors: the folder is damaged; embed it again")
        fresh = [j for j, row in enumerate(rows)
                 if existing.get((row["image_path"], row["key"])) != (row["hash"], row["caption"])]
        unchanged += len(rows) - len(fresh)
        for start in range(0, len(fresh), CHUNK):
            chunk = fresh[start:start + CHUNK]
            records = [_record(rows[j], texts[j] if texts is not None and rows[j]["caption"] else None)
                       for j in chunk]
            writer._commit(records, np.asarray(images[chunk], dtype=np.float16))
        bar.update(1)
    bar.close()
    return {"indexed": writer.counts["indexed"], "updated": writer.counts["updated"], "reused": 0,
            "unchanged": unchanged, "removed": 0, "skipped": dict(sorted(skipped.items())),
            "items": writer._count(), "partitions": len(done),
            "partitions_unfinished": config["partitions"] - len(done)}


def _record(row: dict, caption_vector) -> tuple:
    entry = Entry(row["source"], row["image_path"], row["key"], row["size"], row["mtime_ns"], row["caption"],
                  row["member"], row["offset"])
    info = (row["width"], row["height"], row["taken"], *captured_from_exif_text(row["taken"], row["mtime_ns"]))
    vector = None if caption_vector is None else np.asarray(caption_vector, dtype=np.float16)
    return entry, row["hash"], info, vector
