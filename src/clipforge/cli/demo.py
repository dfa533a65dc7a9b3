"""``clipforge demo``: train a small CLIP on the built-in data and report what it learned."""
from __future__ import annotations

import argparse
import dataclasses

from clipforge.apps.demo import DemoConfig, run_demo, search_own_images

HELP = ("Train a small CLIP on the built-in data and report what it learned. "
        "Generates the built-in coloured-shapes data, trains a small CLIP on the CPU (a few minutes), then "
        "evaluates zero-shot transfer to colour-shape pairs never seen in training, retrieval, a linear probe "
        "and prompt ensembling; writes report.md with figures into --output.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument("--output", default=defaults.output, help="folder for data, run and report")
    parser.add_argument("--model", default=defaults.model, help="architecture to train")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples,
                        help="images in each evaluation set")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="data-loading processes")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def run(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in fields})
    report = run_demo(cfg)
    print(f"\nreport written to {report}")
    print(report.read_text(encoding="utf-8").split("\n\n![")[0])
    print("\n" + search_own_images(cfg))
    return 0
