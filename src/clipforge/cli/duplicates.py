"""``clipforge duplicates``: print the groups of duplicate photos in an index, with a suggested keeper each."""
from __future__ import annotations

import argparse
import json

from clipforge.cli.options import add_json_option
from clipforge.search import Index
from clipforge.search.duplicates import DEFAULT_THRESHOLD, find_duplicates

HELP = f"""Find duplicate photos in an index built by `clipforge index` (a folder, or a postgresql:// URL).

Two files are duplicates when they have the same bytes (content hash), or when their stored image vectors
have cosine --threshold or more (default {DEFAULT_THRESHOLD}): re-encoded, resized, lightly cropped or edited
copies. Groups are the connected components of that relation. Nothing is encoded: the stored vectors are
compared, every pair exactly, or above 20,000 items approximately, each item with the items of the nearest
cells of a k-means partition of the vectors (--exact or --approximate decide instead).

Each group lists its files with their size, pixel size and capture time (EXIF, else the file's mtime), and
suggests one to keep: the most pixels, then the oldest capture, then the largest file; each other file shows
its cosine to the keeper ("same bytes" for an exact copy). This command only reads: it never deletes, moves
or changes a file. --json prints the groups as data (kind, keeper, redundant_bytes, members)."""

EXAMPLES = """examples:
  clipforge duplicates ~/.clipforge/pictures
  clipforge duplicates idx --threshold 0.97 --json > groups.json
  clipforge duplicates 'postgresql://me@localhost/photos?table=pictures'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("index", metavar="INDEX", help="the index folder, or a postgresql:// URL with ?table=NAME")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T",
                        help=f"near-duplicates have image cosine at least T (default {DEFAULT_THRESHOLD}; "
                             "higher: only closer copies)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true", help="compare every pair, however large the index")
    how.add_argument("--approximate", action="store_true",
                     help="compare each item only with the items of its nearest k-means cells, however small the index")
    add_json_option(parser)


def run(args: argparse.Namespace) -> int:
    approximate = True if args.approximate else False if args.exact else None
    with Index.open(args.index) as index:
        groups = find_duplicates(index, args.threshold, approximate)
        items = len(index)
    if args.json:
        print(json.dumps({"threshold": args.threshold, "items": items, "groups": [g.to_dict() for g in groups]},
                         indent=2))
        return 0
    print(_summary(groups, items, args.threshold))
    for number, group in enumerate(groups, 1):
        print(f"\ngroup {number}: {'exact copies' if group.kind == 'exact' else 'near-duplicates'}, "
              f"{len(group.members)} files, {_bytes(group.redundant_bytes)} besides the keeper")
        for member in group.members:
            print(_member_line(member, member is group.keeper))
    return 0


def _summary(groups, items: int, threshold: float) -> str:
    if not groups:
        return f"no duplicates among {items:,} items at cosine {threshold} or more"
    copies = sum(len(g.members) - 1 for g in groups)
    exact = sum(g.kind == "exact" for g in groups)
    return (f"{len(groups)} groups ({exact} of exact copies) among {items:,} items at cosine {threshold} or more: "
            f"{copies} files besides the suggested keepers, {_bytes(sum(g.redundant_bytes for g in groups))}. "
            "Nothing was deleted or moved.")


def _member_line(member, keeper: bool) -> str:
    when = member.captured[:16].replace("T", " ") if member.captured else "no date"
    note = "" if keeper else "  same bytes" if member.exact else f"  cosine {member.similarity:.3f}"
    pixels = f"{member.width}x{member.height}"
    return (f"  {'keep' if keeper else '    '}  id:{member.id:<6d} {pixels:>11} {_bytes(member.size):>9}  {when:16}  "
            f"{member.path}{note}")


def _bytes(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return ""
