"""``clipforge search``: query a search index by text, image or indexed item, and print the best matches."""
from __future__ import annotations

import argparse
import dataclasses
import json

from clipforge.cli.options import (
    add_device_option,
    add_json_option,
    add_nprobe_option,
    add_precision_option,
    console_warnings,
)
from clipforge.search import Index

HELP = """Search an index built by `clipforge index` (a folder, or a postgresql:// URL).

QUERY is text, an image path, or id:N (the indexed item N: "more like this"), combined with signs and weights:
"beach + 0.5:sunset - people", ./query.jpg + "at night", id:42 - 0.3:id:7. A + or - must stand alone between
spaces; W:term weights a term; text in double quotes is always text. The query vector is the weighted sum of
the terms' L2-normalised embeddings, renormalised; results are ranked by cosine similarity to it, exactly (or
with the approximate index, when the index has one).

Filters run in the store: --folder, --after/--before (the capture time: EXIF DateTimeOriginal, else the file's
mtime, as the local time where the photo was taken), --caption-contains, --min-score, and tag:LABEL in the
query (labels given by `clipforge tag`; _ for a space). A frame of an indexed video prints as VIDEO@mm:ss.

Output: score, id and path (shard.tar:key inside a shard) per line (and the capture time with --sort date or a
date filter), or --json (a list of results), or --paths-only for piping (e.g. into xargs). Queries are encoded
with the model the index was built with (its config.json or configuration row), on --device, in the precision
its vectors were encoded in (fp32 or int8; --precision chooses, and a mismatch is said once). In PostgreSQL,
search and filters run in the database."""

EXAMPLES = """examples:
  clipforge search ~/.clipforge/pictures "a dog on a beach" --top 5
  clipforge search idx "beach + 0.5:sunset - people" --folder ~/Pictures/2024 --dedup 0.95
  clipforge search idx "birthday cake" --after 2024-01-01 --before 2025-01-01 --sort date --min-score 0.2
  clipforge search idx ./query.jpg + "at night" --json
  clipforge search idx id:42 --paths-only | xargs feh"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("index", metavar="INDEX", help="the index folder, or a postgresql:// URL with ?table=NAME")
    parser.add_argument("query", nargs="+", metavar="QUERY", help="the query (see above)")
    parser.add_argument("--top", type=int, default=10, metavar="K", help="results to show (default 10)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many results first (paging)")
    parser.add_argument("--folder", metavar="PREFIX", help="only items whose path starts with PREFIX")
    parser.add_argument("--min-score", type=float, metavar="S", help="only results with cosine at least S")
    parser.add_argument("--dedup", type=float, metavar="T",
                        help="drop results whose cosine to a better result is at least T (e.g. 0.95)")
    parser.add_argument("--after", metavar="DATE", help="only items captured at or after DATE (YYYY-MM-DD or "
                                                        "YYYY-MM-DDTHH:MM): EXIF time, else the file's mtime")
    parser.add_argument("--before", metavar="DATE", help="only items captured before DATE (same forms)")
    parser.add_argument("--caption-contains", metavar="TEXT", help="only items whose caption contains TEXT")
    parser.add_argument("--sort", choices=["score", "date"], default="score",
                        help="score: best first (default); date: newest first, of the results that pass "
                             "--min-score and the filters")
    parser.add_argument("--captions", action="store_true", help="search the caption vectors instead of images")
    parser.add_argument("--exact", action="store_true", help="exact search even where an approximate index exists")
    output = parser.add_mutually_exclusive_group()
    add_json_option(output)
    output.add_argument("--paths-only", action="store_true", help="print only the paths, one per line")
    add_device_option(parser)
    add_precision_option(parser, "queries")
    add_nprobe_option(parser)


def run(args: argparse.Namespace) -> int:
    if args.top < 1 or args.offset < 0:
        raise ValueError(f"--top must be at least 1 and --offset at least 0, got {args.top} and {args.offset}")
    if args.dedup is not None and not -1 <= args.dedup <= 1:
        raise ValueError(f"--dedup is a cosine similarity between -1 and 1, got {args.dedup}")
    with console_warnings("search"), Index.open(args.index, device=args.device, precision=args.precision,
                                                  nprobe=args.nprobe) as index:
        results = index.search(" ".join(args.query), top_k=args.top, offset=args.offset, folder=args.folder,
                               min_score=args.min_score, dedup=args.dedup, captions=args.captions,
                               approximate=False if args.exact else None, after=args.after, before=args.before,
                               caption=args.caption_contains, sort=args.sort)
    dated = args.sort == "date" or args.after is not None or args.before is not None
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    elif args.paths_only:
        print("\n".join(r.path for r in results))
    else:
        for r in results:
            caption = f"  {r.caption}" if r.caption else ""
            when = f"  {r.captured[:19].replace('T', ' ')}" if dated and r.captured else ""
            print(f"{r.score:7.4f}  id:{r.id:<6d} {r.path}{when}{caption}")
    return 0
