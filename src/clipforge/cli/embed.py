"""``clipforge embed``: image and caption embeddings of folders, CSV/TSV files and WebDataset shards, written in
clip-retrieval's layout by one process, torchrun's ranks or a Ray cluster."""
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
from clipforge.search.embed import ENGINES, EmbedOptions, embed
from clipforge.search.embeddings import DTYPES

HELP = """Embed images (and their captions) into a folder in clip-retrieval's layout: img_emb/img_emb_N.npy,
text_emb/text_emb_N.npy (when the sources have captions) and metadata/metadata_N.parquet, one metadata row per
vector in the same order, float16 unless --dtype float32; embedding-reader and autofaiss read it as it is.
embeddings.json records the model (as an index's config.json does) and the preprocessing.

Sources as for `clipforge index`: image folders, CSV/TSV files (filepath and optional caption columns) and
WebDataset shards. The work is cut into partitions (--partition-size images of a folder or table; one per
shard), each written whole or not at all; running the command again skips the complete ones, so a killed run
continues where it stopped. Unreadable images are skipped and counted by reason.

Engines: local (default; one process on its CPU or GPU, --workers decoding beside it); under torchrun
(torchrun --nproc_per_node K -m clipforge embed ...) each rank writes its own partitions to the shared
--output; --engine ray runs a Ray Data pipeline (decoding in CPU tasks, encoding in --ray-actors actors, one
GPU each when the cluster has GPUs) on the cluster at --ray-address or RAY_ADDRESS, else a local one."""

EXAMPLES = """examples:
  clipforge embed ~/Pictures --model ViT-B/32 --output emb
  torchrun --nproc_per_node 8 -m clipforge embed 'shards/{00000..09999}.tar' --model ViT-B/32 --output /shared/emb
  clipforge embed 'shards/{00000..09999}.tar' --model ViT-B/32 --output /shared/emb --engine ray --ray-address auto"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="image folders, CSV/TSV files, .tar shards")
    parser.add_argument("--output", required=True, metavar="DIR", help="the embeddings folder (created if new)")
    add_model_options(parser)
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local (one process, or each torchrun rank) or ray (a Ray Data pipeline)")
    parser.add_argument("--partition-size", type=int, default=EmbedOptions.partition_size, metavar="N",
                        help=f"images of a folder or table per partition (default {EmbedOptions.partition_size:,}; "
                             "a shard is one partition)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="the stored vectors' type (default float16)")
    add_decoding_options(parser)
    parser.add_argument("--rebuild", action="store_true", help="discard the folder's embeddings and start over")
    parser.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster (default: RAY_ADDRESS, else a new "
                                                              "local one)")
    parser.add_argument("--ray-actors", type=int, metavar="N",
                        help="encoding actors on Ray (default: one per GPU of the cluster, else one)")
    add_device_option(parser)
    add_precision_option(parser, "embed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_option(parser)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.workers < 0 or args.partition_size < 1:
        raise ValueError(f"--batch-size and --partition-size must be at least 1 and --workers at least 0, got "
                         f"{args.batch_size}, {args.partition_size} and {args.workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = model_spec(args)  # refused here, before anything is written
    options = EmbedOptions(batch_size=args.batch_size, workers=args.workers, partition_size=args.partition_size,
                           exclude=tuple(args.exclude), max_pixels=args.max_pixels, fast_decode=args.fast_decode,
                           dtype=args.dtype, progress=not args.no_progress, rebuild=args.rebuild)
    if args.engine == "ray":
        if os.environ.get("WORLD_SIZE", "1") != "1":
            raise ValueError("--engine ray runs from one process; start it without torchrun")
        result = embed(args.output, args.sources, spec.text, options, random_init=spec.random_init, engine="ray",
                       ray_address=args.ray_address, ray_actors=args.ray_actors, precision=args.precision or "fp32")
    else:
        env = init_distributed(args.device or "auto")
        try:
            result = embed(args.output, args.sources, spec.text, options, device=args.device,
                           random_init=spec.random_init, precision=args.precision or "fp32")
        finally:
            cleanup(env)
    if result:  # rank 0's (the other ranks return none)
        print(json.dumps(result, indent=2) if args.json else summary_line(result))
    return 0


def summary_line(summary: dict) -> str:
    """One line: partitions embedded now and before, vectors, skipped images by reason, the folder."""
    skipped = summary["skipped"]
    reasons = f" ({', '.join(f'{r}: {n}' for r, n in skipped.items())})" if skipped else ""
    return (f"embedded {summary['embedded']} partitions, {summary['already_done']} already done; "
            f"{summary['vectors']} vectors in {summary['partitions']} partitions, skipped "
            f"{sum(skipped.values())}{reasons}; in {summary['output']}")
