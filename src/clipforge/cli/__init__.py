"""The ``clipforge`` command line: thin subcommands that parse, call the library and print.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = ["demo", "train", "classify", "explain", "eval", "export", "embed", "index", "search", "duplicates",
                "serve", "tag", "study"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP: train, classify, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"clipforge.cli.{name}")
        summary = " ".join(module.HELP.split()).split(". ")[0].rstrip(".:;")
        p = sub.add_parser(name, help=summary, description=module.HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"clipforge {args.command}: error: {e}", file=sys.stderr)
        return 2
