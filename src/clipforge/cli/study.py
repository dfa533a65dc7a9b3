"""``clipforge study``: run the CLIP paper's experiments on the built-in data and write their report."""
from __future__ import annotations

import argparse

from clipforge.apps.study import EXPERIMENTS, SCALES, run_study
from clipforge.apps.study.framework import CHOICES

HELP = ("Measure the CLIP paper's claims on the built-in data and write a report. "
        "Runs the experiments named (default: all, in paper order: " + ", ".join(EXPERIMENTS) + ") and writes "
        "DIR/report.md and a self-contained DIR/report.html: per experiment what the paper reports, a table of "
        "what was measured here (mean and spread over seeds), a figure and whether the two agree. --scale quick "
        "takes about 10 minutes on two idle CPU cores; full runs longer, with 3 seeds. An interrupted study picks up where it "
        "stopped: run the same command again.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help="experiments to run (default: all): " + ", ".join(EXPERIMENTS))
    parser.add_argument("--output", default="study_output",
                        help="folder for runs, results, figures and report: new, empty or an earlier study's "
                             "(default: study_output)")
    parser.add_argument("--scale", default="quick", metavar="|".join(CHOICES),
                        help="quick (default; about 10 minutes on 2 idle CPU cores, 1 seed) or full (longer runs, "
                             f"{SCALES['full'].seeds} seeds)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds per variant (default: the scale's)")


def run(args: argparse.Namespace) -> int:
    if args.scale not in SCALES:
        raise ValueError(f"--scale {args.scale!r}: expected one of {', '.join(CHOICES)}")
    report = run_study(args.output, args.experiments, args.scale, args.seeds)
    print(f"\nreport written to {report} (and {report.with_suffix('.html')})")
    summary = report.read_text(encoding="utf-8").split("## Summary\n\n", 1)[-1].split("\n\n", 1)[0]
    print(summary)
    return 0
