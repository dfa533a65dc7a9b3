"""``clipforge index``: build or update a search index of image folders, CSV/TSV files and WebDataset shards."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..search import Index
from ..search.store import read_config
from clipforge.runtime.distributed import cleanup, init_distributed

HELP = """Build or incrementally update a search index of images (see `clipforge search`).

Sources, in any mix: image folders (recursive; hidden folders, .git, node_modules and @eaDir are skipped,
plus --exclude GLOB), CSV/TSV files (a filepath column and an optional caption column; relative paths are
relative to the file) and WebDataset shards ('shards/{00000..00099}.tar', image + optional txt members).
Captions are encoded into a second set of vectors (`clipforge search --captions`).

Running it again encodes only new or changed files (size + mtime, then content hash), drops deleted
ones and reuses the vectors of renamed or duplicated content. Unreadable files are skipped and counted
by reason, and retried only once they change. Killing it loses at most the batch in flight.

Many GPUs or machines: torchrun --nproc_per_node K -m clipforge index ... splits the encoding over the
ranks; rank 0 writes the same index one process would. On a CPU, --workers processes decode and
preprocess while --threads torch threads encode (default: all cores)."""

EXAMPLES = """examples:
  clipforge index ~/Pictures --model ViT-B/32 --index ~/.clipforge/pictures
  clipforge index photos captions.csv 'shards/{00000..00009}.tar' --model runs/tiny --index idx --exclude '*/raw/*'
  torchrun --nproc_per_node 4 -m clipforge index shards/ --model ViT-B/32 --index idx"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="image folders, CSV/TSV files, .tar shards")
    parser.add_argument("--index", required=True, metavar="DIR", help="the index folder (created if new)")
    parser.add_argument("--model", help="model name with weights (ViT-B/32, ...) or a saved model / run "
                                        "directory; default: the model of the existing index")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="leave out folder paths matching GLOB (relative to the folder; repeatable)")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded at once (default 64)")
    parser.add_argument("--workers", type=int, default=_default_workers(),
                        help=f"DataLoader processes decoding images (default {_default_workers()}: cores - 1)")
    parser.add_argument("--threads", type=int, help="torch threads for encoding (default: all cores)")
    parser.add_argument("--max-pixels", type=int, help="skip images with more pixels (default 89,478,485)")
    parser.add_argument("--fast-decode", action="store_true",
                        help="decode JPEGs at reduced scale (draft mode): faster, slightly different vectors")
    parser.add_argument("--approximate", choices=["auto", "always", "never"], default="auto",
                        help="build a faiss HNSW index too: always, never, or auto (above 200,000 items)")
    parser.add_argument("--rebuild", action="store_true", help="discard the existing index and start over")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be at least 1 and --workers at least 0, got {args.batch_size} "
                         f"and {args.workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or _existing_model(args.index)
    env = init_distributed(args.device or "auto")
    try:
        index = Index.build(args.index, args.sources, model=model, device=args.device, batch_size=args.batch_size,
                            workers=args.workers, exclude=args.exclude, max_pixels=args.max_pixels,
                            rebuild=args.rebuild, progress=not args.no_progress, fast_decode=args.fast_decode,
                            approximate=args.approximate)
    finally:
        cleanup(env)
    if env.is_master:
        print(json.dumps(index.last_update, indent=2) if args.json else summary_line(index.last_update, args.index))
    return 0


def _existing_model(folder: str) -> str:
    config = read_config(Path(folder))
    if config is None:
        raise ValueError(f"--model is needed to create a new index in {folder}")
    return config["model"]


def summary_line(summary: dict, folder: str) -> str:
    """One line: indexed, updated, reused, unchanged, removed, skipped by reason, total."""
    skipped = summary["skipped"]
    reasons = f" ({', '.join(f'{r}: {n}' for r, n in skipped.items())})" if skipped else ""
    return (f"indexed {summary['indexed']}, updated {summary['updated']}, vectors reused {summary['reused']}, "
            f"unchanged {summary['unchanged']}, removed {summary['removed']}, skipped {sum(skipped.values())}"
            f"{reasons}; {summary['items']} items in {folder}")
