"""``clipforge index``: build or update a search index of image folders, CSV/TSV files and WebDataset shards."""
from __future__ import annotations

import argparse
import json
import os

import torch

from clipforge.cli.options import (
    add_decoding_options,
    add_device_option,
    add_json_option,
    add_model_options,
    add_precision_option,
    model_spec,
)
from clipforge.runtime.distributed import cleanup, init_distributed
from clipforge.search import Index, is_database_url
from clipforge.search.approximate import describe
from clipforge.search.ivfpq import parse_size
from clipforge.search.model import indexed_spec
from clipforge.search.stores import read_index_config

HELP = """Build or incrementally update a search index of images (see `clipforge search`).

The index is a folder (the default), or a table in PostgreSQL with pgvector, named by a URL:
--index 'postgresql://USER@HOST/DB?table=photos' (the postgres extra; settings the URL leaves out come from
the PG* environment variables and ~/.pgpass). Several runs may write one PostgreSQL index at once; runs on
the same source take turns. --copy-from INDEX copies an existing index (a folder or a URL) into --index
with its ids and vectors, encoding nothing.

Sources, in any mix: image folders (recursive; hidden folders, .git, node_modules and @eaDir are skipped,
plus --exclude GLOB), CSV/TSV files (a filepath column and an optional caption column; relative paths are
relative to the file) and WebDataset shards ('shards/{00000..00099}.tar', image + optional txt members).
Captions are encoded into a second set of vectors (`clipforge search --captions`).

Running it again encodes only new or changed files (size + mtime, then content hash), drops deleted
ones and reuses the vectors of renamed or duplicated content. Unreadable files are skipped and counted
by reason, and retried only once they change. Killing it loses at most the batch in flight.

--model follows the rule of every command (a name with weights, ARCH:TAG, a saved model or run directory,
RUN@best; --random-init for seed-0 random weights); without it, the existing index's model is used again.
The index records the model in its config.json and refuses another one's. --json prints the summary.

Many GPUs or machines: torchrun --nproc_per_node K -m clipforge index ... splits the encoding over the
ranks; rank 0 writes the same index one process would. On a CPU, --workers processes decode and
preprocess while --threads torch threads encode (default: all cores). --approximate builds a faiss IVF
index beside a folder's vectors, or pgvector's HNSW index in PostgreSQL. For more vectors than RAM,
--approximate ivfpq builds a folder's compressed IVF-PQ index on disk (memory-mapped when searched, its best
candidates re-scored against the stored vectors), its parameters chosen to fit --max-index-memory."""

EXAMPLES = """examples:
  clipforge index ~/Pictures --model ViT-B/32 --index ~/.clipforge/pictures
  clipforge index photos captions.csv 'shards/{00000..00009}.tar' --model runs/tiny --index idx --exclude '*/raw/*'
  torchrun --nproc_per_node 4 -m clipforge index shards/ --model ViT-B/32 --index idx
  clipforge index ~/Pictures --model ViT-B/32 --index 'postgresql://me@dbhost/photos?table=pictures'
  clipforge index --copy-from ~/.clipforge/pictures --index 'postgresql://me@dbhost/photos?table=pictures'
  clipforge index --from-embeddings laion-emb --index laion --approximate ivfpq --max-index-memory 4GB"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="image folders, CSV/TSV files, .tar shards")
    parser.add_argument("--index", required=True, metavar="INDEX",
                        help="the index folder (created if new), or a postgresql:// URL with ?table=NAME")
    parser.add_argument("--copy-from", metavar="INDEX",
                        help="copy this index (a folder or a postgresql:// URL) into --index, vectors and ids as "
                             "they are, instead of indexing SOURCEs")
    parser.add_argument("--from-embeddings", metavar="DIR",
                        help="add the vectors and metadata of an embeddings folder (clipforge embed's output) to "
                             "--index as they are, instead of indexing SOURCEs")
    add_model_options(parser, required=False)
    add_decoding_options(parser)
    parser.add_argument("--approximate", choices=["auto", "always", "never", "ivfpq"], default="auto",
                        help="build an approximate index too (a folder: faiss IVF-Flat, inverted lists over k-means "
                             "cells beside the exact vectors; PostgreSQL: pgvector HNSW): always, never, or auto "
                             "(above 200,000 items, or the index's IVF-PQ); ivfpq: a folder's compressed faiss "
                             "IVF-PQ index on disk, re-ranked exactly, for more vectors than RAM")
    parser.add_argument("--max-index-memory", type=_size, metavar="SIZE",
                        help="the most the approximate index may take (512MB, 4GB; K, M, G = powers of 1024): "
                             "IVF-PQ's code size is chosen to fit it, and auto builds IVF-PQ instead of an IVF-Flat "
                             "index that would not fit (default: no limit)")
    parser.add_argument("--rebuild", action="store_true", help="discard the existing index and start over")
    parser.add_argument("--video-every", type=float, default=5.0, metavar="S",
                        help="videos in folders (MP4, MOV, MKV, WebM; the video extra): a frame every S seconds "
                             "(default 5; 0: only the first frame), each an item searched as VIDEO@mm:ss")
    parser.add_argument("--video-scenes", choices=["on", "off"], default="on",
                        help="also a frame at each scene change of a video (default on)")
    parser.add_argument("--watch", action="store_true",
                        help="keep running: apply additions, changes, renames and deletions under the sources as "
                             "they happen (file-system events; the watch extra), until interrupted")
    parser.add_argument("--rescan-interval", type=float, default=300, metavar="S",
                        help="with --watch, an incremental run at least every S seconds, events or not: file "
                             "systems that send none, such as network shares (default 300)")
    add_device_option(parser)
    add_precision_option(parser, "index")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_option(parser)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be at least 1 and --workers at least 0, got {args.batch_size} "
                         f"and {args.workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.approximate == "ivfpq" and is_database_url(args.index):  # refused before anything is encoded
        raise ValueError("--approximate ivfpq is the folder store's compressed index; a PostgreSQL index has "
                         "pgvector's HNSW index: use --approximate always (or auto)")
    if args.copy_from is not None or args.from_embeddings is not None:
        return _copy(args)
    if not args.sources:
        raise ValueError("give the SOURCEs to index (image folders, CSV/TSV files, .tar shards), or --copy-from INDEX")
    model, random_init = _model(args)  # refused here, before anything is written
    if args.watch:
        return _watch(args, model, random_init)
    env = init_distributed(args.device or "auto")
    try:
        index = Index.build(args.index, args.sources, model=model, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, exclude=args.exclude, max_pixels=args.max_pixels,
                            rebuild=args.rebuild, progress=not args.no_progress, fast_decode=args.fast_decode,
                            approximate=args.approximate, random_init=random_init,
                            max_index_memory=args.max_index_memory, precision=args.precision,
                            **_video_options(args))
    finally:
        cleanup(env)
    if env.is_master:
        shown = index.store.location
        print(json.dumps(index.last_update, indent=2) if args.json else summary_line(index.last_update, shown))
        _describe_approximate(index, args)
    return 0


def _watch(args: argparse.Namespace, model: str, random_init: bool) -> int:
    """--watch: the first run, then one after each settled burst of file-system events, until SIGINT/SIGTERM."""
    import signal
    import threading

    from clipforge.search.watch import watch
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--watch runs in one process; start it without torchrun")
    if args.rescan_interval <= 0:
        raise ValueError(f"--rescan-interval must be positive, got {args.rescan_interval}")
    options = dict(device=args.device, batch_size=args.batch_size, workers=args.workers, exclude=args.exclude,
                   max_pixels=args.max_pixels, progress=False, fast_decode=args.fast_decode,
                   approximate=args.approximate, precision=args.precision, **_video_options(args))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def report(summary: dict) -> None:
        print(json.dumps(summary) if args.json else summary_line(summary, _shown(args.index)), flush=True)

    try:
        watch(args.index, args.sources,
              build=lambda: Index.build(args.index, args.sources, model=model, rebuild=args.rebuild,
                                        random_init=random_init, **options),
              update=lambda index: index.update(args.sources, **{k: v for k, v in options.items() if k != "device"}),
              report=report, stop=stop, rescan_s=args.rescan_interval)
    except KeyboardInterrupt:
        pass
    return 0


def _video_options(args: argparse.Namespace) -> dict:
    if args.video_every < 0:
        raise ValueError(f"--video-every is a number of seconds, at least 0, got {args.video_every}")
    return {"video_every": args.video_every or None, "video_scenes": args.video_scenes == "on"}


def _shown(location) -> str:
    from clipforge.search.pg.url import redact
    return redact(location) if is_database_url(location) else str(location)


def _copy(args: argparse.Namespace) -> int:
    """--copy-from INDEX and --from-embeddings DIR: vectors as they are, with the model they were made with."""
    option = "--copy-from" if args.copy_from is not None else "--from-embeddings"
    if args.copy_from is not None and args.from_embeddings is not None:
        raise ValueError("give --copy-from or --from-embeddings, not both")
    if (args.sources or args.model is not None or args.pretrained is not None or args.random_init
            or args.precision is not None):
        raise ValueError(f"{option} takes vectors as they are: give no SOURCEs, --model or --precision (the index "
                         f"keeps the model and precision that made them); index new images into it afterwards")
    if args.copy_from is not None:
        index = Index.copy(args.copy_from, args.index, rebuild=args.rebuild, approximate=args.approximate,
                           progress=not args.no_progress, max_index_memory=args.max_index_memory)
        summary = index.last_update
        line = (f"copied {summary['copied']} items ({summary['already']} already there); {summary['items']} items in "
                f"{index.store.location}")
    else:
        index = Index.from_embeddings(args.from_embeddings, args.index, rebuild=args.rebuild,
                                      approximate=args.approximate, progress=not args.no_progress,
                                      max_index_memory=args.max_index_memory)
        summary = index.last_update
        line = summary_line(summary, index.store.location)
        if summary["partitions_unfinished"]:
            line += (f" ({summary['partitions_unfinished']} partitions of {args.from_embeddings} are not finished "
                     f"yet: run this again once clipforge embed has written them)")
    print(json.dumps(summary, indent=2) if args.json else line)
    _describe_approximate(index, args)
    return 0


def _describe_approximate(index: Index, args: argparse.Namespace) -> None:
    """The approximate index's chosen parameters and measured recall, on a line of its own (not with --json:
    config.json records them)."""
    info = index.config.get("approximate")
    if info and not args.json:
        print(describe(info))


def _model(args: argparse.Namespace) -> tuple[str, bool]:
    """(model spec in one string, random_init): --model's, else the existing index's."""
    if args.model is not None:
        spec = model_spec(args)
        return spec.text, spec.random_init
    if args.pretrained is not None or args.random_init:
        raise ValueError("--pretrained and --random-init go with --model")
    config = read_index_config(args.index)
    if config is None:
        raise ValueError(f"--model is needed to create a new index in {args.index}")
    return indexed_spec(config)


def summary_line(summary: dict, folder: str) -> str:
    """One line: indexed, updated, reused, unchanged, removed, skipped by reason, total."""
    skipped = summary["skipped"]
    reasons = f" ({', '.join(f'{r}: {n}' for r, n in skipped.items())})" if skipped else ""
    return (f"indexed {summary['indexed']}, updated {summary['updated']}, vectors reused {summary['reused']}, "
            f"unchanged {summary['unchanged']}, removed {summary['removed']}, skipped {sum(skipped.values())}"
            f"{reasons}; {summary['items']} items in {folder}")
