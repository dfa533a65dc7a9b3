"""Embedding images (and their captions) into an embeddings folder (``clipforge.search.embeddings``), partition by
partition (``clipforge.search.partitions``): in one process, on torchrun's ranks (each writing its own partitions,
nothing through rank 0) or on a Ray cluster (``clipforge.search.embed_ray``); all write the same folder, and a
rerun continues where a killed one stopped."""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch

from clipforge.data import collate_described
from clipforge.encode import encode_captions, encode_images
from clipforge.runtime.distributed import DistEnv, barrier, init_distributed
from clipforge.search import embeddings
from clipforge.search.embed_ray import embed_ray
from clipforge.search.embeddings import PartitionData
from clipforge.search.model import load_model, model_identity
from clipforge.search.partitions import (
    EmbedOptions,
    HashedImages,
    Progress,
    Work,
    check_same_run,
    folder_config,
    metadata_row,
    partition_data,
    plan_partitions,
    prepare_folder,
    summary,
)
from clipforge.search.plan import resolve_sources

ENGINES = ("local", "ray")


def embed(folder: str | os.PathLike, sources, model: str, options: EmbedOptions = EmbedOptions(),
          device: str | None = None, random_init: bool = False, engine: str = "local",
          ray_address: str | None = None, ray_actors: int | None = None, precision: str = "fp32") -> dict:
    """Embed the images of ``sources`` (image folders, CSV/TSV files, WebDataset shards) with the model spec
    ``model`` into the embeddings folder ``folder``; returns the summary (``summary``; rank 0's under torchrun,
    ``{}`` on the other ranks).

    ``engine``: "local" (this process, or under torchrun each rank its own partitions, ``n % world_size``)
    or "ray" (a Ray Data pipeline on the cluster at ``ray_address``, else the running one or a new local one;
    ``ray_actors`` encoders, default one per GPU, else one). Partitions already complete are skipped.
    ``precision``: "fp32" or "int8" (CPU encoders only; recorded in the model identity, as an index records it)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if options.dtype not in embeddings.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(embeddings.DTYPES)}, got {options.dtype!r}")
    if options.partition_size < 1 or options.batch_size < 1:
        raise ValueError("partition_size and batch_size must be at least 1")
    folder, sources = Path(folder), resolve_sources(sources)
    embeddings.parquet()  # refused now, not once the first partition is encoded
    if engine == "ray":
        return embed_ray(folder, sources, model, options, random_init, ray_address, ray_actors, precision)
    env = init_distributed(device or "auto")
    works = plan_partitions(sources, options)  # every rank lists the sources itself
    network, preprocess = load_model(str(model), env.device, random_init, precision)
    config = folder_config(model_identity(str(model), network, preprocess, random_init), sources, works, options)
    if env.is_master:  # before any rank writes: partitions finished by an earlier run
        prepare_folder(folder, config, options.rebuild)
        done = embeddings.finished(folder, len(works))
    barrier(env)
    if not env.is_master:  # the same model and plan as rank 0, or a clear error instead of a mixed folder
        check_same_run(folder, embeddings.read_config(folder), config)
        done = embeddings.finished(folder, len(works))
    todo = [w for w in works if w.number not in done]
    progress = Progress(works, todo, options.progress and env.is_master)
    for work in todo:
        if work.number % env.world_size == env.rank:
            data = encode_partition(work, network, preprocess, options, config["text"], progress)
            embeddings.write_partition(folder, data, len(works), config["text"])
            progress.partition(work, data.listed)
        if env.is_master:
            _count_others(folder, works, todo, progress, env)
    if not env.is_master:
        return {}
    _wait_for_others(folder, works, todo, progress, env)
    progress.close()
    return summary(folder, works, len(done))


def _count_others(folder: Path, works: list[Work], todo: list[Work], progress: Progress, env: DistEnv) -> None:
    """Rank 0 counts the partitions other ranks have written, from their records (no messages between ranks),
    at most every two seconds."""
    if not env.distributed or time.monotonic() < progress.next_poll:
        return
    progress.next_poll = time.monotonic() + 2.0
    written = embeddings.finished(folder, len(works))
    for work in todo:
        if work.number in written and work.number % env.world_size != 0 and work.number not in progress.counted:
            progress.partition(work, embeddings.read_record(folder, work.number, len(works))["listed"],
                               images_counted=False)


def _wait_for_others(folder: Path, works: list[Work], todo: list[Work], progress: Progress, env: DistEnv) -> None:
    """Rank 0 waits for the other ranks' partitions by polling their records: a barrier would time out while
    a slower rank still has hours of work (torchrun ends every rank when one fails)."""
    while env.distributed and len(progress.counted) < len(todo):
        time.sleep(max(0.0, progress.next_poll - time.monotonic()))
        _count_others(folder, works, todo, progress, env)


def encode_partition(work: Work, network, preprocess, options: EmbedOptions, text: bool, progress) -> PartitionData:
    """Decode (``options.workers`` DataLoader processes), hash and encode one partition's images."""
    entries, problems = work.listed()
    draft = preprocess.config.image_size if options.fast_decode else None
    dataset = HashedImages([e.ref for e in entries], preprocess, options.max_pixels, draft)
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, collate_fn=collate_described,
                                         num_workers=options.workers if len(entries) > options.batch_size else 0)
    encoded, skipped = [], []
    for local, tensors, infos, bad in loader:
        if tensors is not None:
            vectors = encode_images(network, tensors, batch_size=len(tensors)).cpu().numpy()
            texts = (encode_captions(network, [entries[i].caption for i in local], vectors.shape[1]).numpy()
                     if text else itertools.repeat(None))
            encoded += [(i, v, t, metadata_row(entries[i], *info))
                        for i, v, t, info in zip(local, vectors, texts, infos)]
        skipped += [(entries[i].name, reason, message) for i, reason, message in bad]
        progress.images(len(local) + len(bad))
    return partition_data(work.number, len(entries), encoded, skipped, problems, text, options.dtype,
                          int(network.config.embed_dim))
