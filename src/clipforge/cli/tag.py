"""``clipforge tag``: label every indexed image from a label set, with the index's own model, without encoding."""
from __future__ import annotations

import argparse
import json

from clipforge.cli.options import add_device_option, add_json_option
from clipforge.search import Index
from clipforge.search.tags import TAG_THRESHOLD, TAG_TOP

HELP = """Tag every image of an index (a folder or a postgresql:// URL) with labels from a label set.

Each stored image vector is scored against each label with the zero-shot classifier of the index's own
model: the label's prompts (--templates, default "a photo of a {}.") against a neutral prompt, as
`clipforge classify --multi-label` does, so a score above 0.5 means closer to the label than to a generic
object. Each image keeps its --top best labels scoring at least --threshold. Nothing is encoded again but the
labels' prompts. Running it again replaces the tags; `clipforge index` tags new and changed images with the
same label set on its own.

Search with them: `clipforge search INDEX "beach tag:dog"` (tag:golden_retriever for a label with spaces);
the page shows each result's tags and filters by one when clicked."""

EXAMPLES = """examples:
  clipforge tag ~/.clipforge/pictures --labels imagenet1k
  clipforge tag idx --labels labels.txt --threshold 0.6 --top 3 --templates openai"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("index", metavar="INDEX", help="the index folder, or a postgresql:// URL with ?table=NAME")
    parser.add_argument("--labels", required=True, metavar="FILE|NAME",
                        help="a file with one label per line, or a shipped set (imagenet1k, cifar10, pets, ...)")
    parser.add_argument("--templates", metavar="NAME|FILE",
                        help='prompt templates: a set (openai = 80 ImageNet prompts, ...), a file, or one template '
                             'with {} (default "a photo of a {}.")')
    parser.add_argument("--threshold", type=float, default=TAG_THRESHOLD,
                        help=f"lowest score a tag keeps, between 0 and 1 (default {TAG_THRESHOLD})")
    parser.add_argument("--top", type=int, default=TAG_TOP, help=f"labels kept per image at most (default {TAG_TOP})")
    add_device_option(parser)
    add_json_option(parser)


def run(args: argparse.Namespace) -> int:
    with Index.open(args.index, device=args.device) as index:
        summary = index.tag(args.labels, args.templates, args.threshold, args.top)
        where = index.store.location
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        common = ", ".join(f"{label} ({n})" for label, n in summary["most_common"])
        print(f"tagged {summary['tagged']} of {summary['scored']} images with {summary['tags']} tags from "
              f"{summary['labels']} labels in {where}" + (f"; most common: {common}" if common else ""))
    return 0
