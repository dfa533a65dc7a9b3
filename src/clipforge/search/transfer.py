"""Moving an index between stores (a folder and PostgreSQL, either way) with its ids, vectors, captions,
skipped files and shards, without encoding anything again. The copy commits chunk by chunk; run again after a
crash, it copies the items the destination still lacks."""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from clipforge.search.approximate import check_mode
from clipforge.search.model import IDENTITY_KEYS
from clipforge.search.stores import build_target, open_store

CHUNK = 1024


def copy_index(source: str | os.PathLike, destination: str | os.PathLike, rebuild: bool = False,
               approximate: str = "auto", progress: bool = True, max_index_memory: int | None = None) -> dict:
    """Copy the index at ``source`` into ``destination`` (a new index, one that is an unfinished copy of the
    same, or anything with ``rebuild``), then build the destination's approximate index as ``approximate``
    says ("auto", "always", "never", "ivfpq", within ``max_index_memory`` bytes); returns {"copied", "already",
    "items"}."""
    check_mode(approximate)
    src, source_target = open_store(source), build_target(source)
    target = build_target(destination)
    try:
        identity = {k: src.config[k] for k in IDENTITY_KEYS if k in src.config}
        target.prepare(rebuild)
        config = target.read_config()
        if config is not None and {k: config.get(k) for k in IDENTITY_KEYS} != {k: identity.get(k) for k in
                                                                                  IDENTITY_KEYS}:
            raise ValueError(f"{target.location} already holds an index of model {config['model']}, not the "
                             f"{identity['model']} index at {src.location}; choose another destination, or "
                             f"--rebuild to replace it")
        if config is None:
            target.create(identity)
        have = _ids(target)
        ids = src.ids()
        strangers = have - set(ids.tolist())
        if strangers:
            raise ValueError(f"{target.location} holds items that {src.location} does not (id {min(strangers)}); "
                             f"it is not a copy of it: choose another destination, or --rebuild")
        todo = np.array([i for i in ids.tolist() if i not in have], dtype=np.int64)
        captioned = set(src.ids(captions=True).tolist())
        importer = target.importer()
        bar = tqdm(total=len(todo), unit="items", desc="copying", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            items = sorted(src.items([int(i) for i in chunk]), key=lambda item: item.id)
            with_caption = [int(i) for i in chunk if int(i) in captioned]
            captions = dict(zip(with_caption, src.vectors(with_caption, captions=True))) if with_caption else {}
            importer.add(items, src.vectors(chunk), captions)
            bar.update(len(chunk))
        bar.close()
        with source_target.catalog() as catalog:
            importer.add_skipped(list(catalog.skipped()))
            importer.add_shards(list(catalog.shards()))
        importer.close()
        target.refresh_approximate(approximate, max_index_memory, progress)
        return {"copied": int(len(todo)), "already": len(have), "items": int(len(ids))}
    finally:
        src.close()
        source_target.close()
        target.close()


def _ids(target) -> set[int]:
    with target.catalog() as catalog:
        return {int(row["id"]) for row in catalog.items()}
