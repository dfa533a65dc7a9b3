"""``clipforge eval``: zero-shot, retrieval, linear-probe and robustness evaluation of a model."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from clipforge.cli.options import add_device_option, add_model_options, add_precision_option, model_spec
from clipforge.evaluate import EVALUATORS, get_evaluator
from clipforge.io.factory import load

HELP = """Evaluate a model; prints a table of metrics and, with --output, writes them as JSON
({"task", "model", "data", "metrics": {name: fraction in [0, 1]}, "details": {...}}).

tasks and metrics:
  zeroshot      top1, top5, mean_per_class_recall of the prompt-ensembled zero-shot classifier
  retrieval     image_to_text_recall@{1,5,10}, text_to_image_recall@{1,5,10}
  linear-probe  top1, top5, mean_per_class_recall of an L-BFGS logistic regression on frozen image
                features; L2 strength searched over [1e-6, 1e6] on a validation split
  robustness    top1 on --data and <name>/top1, <name>/drop per --shifted set, mean_shifted_top1

classification data (--data, --train-data, --val-data, --shifted):
  an image folder root/<class>/<images> (ImageNet validation layout), a CSV/TSV with filepath and
  label columns, or WebDataset shards (a .tar, a folder of .tar, or data-{000..009}.tar) with an
  image and an integer .cls per sample. Classes are matched by folder name / label, never by position.
--classnames: a shipped list (imagenet1k, pets, ...), a JSON object {"folder": "name"} or list, a file
  of lines "folder<TAB>name", or one name per line naming the sorted folders in order; for integer
  labels (WebDataset .cls) line i names label i. Without it, folder names are the class names
  (underscores read as spaces).
caption data (retrieval): a Karpathy-split JSON (COCO/Flickr30k; --split, --image-root) or a CSV/TSV
  with filepath and caption (or title) columns, one row per caption.

Unreadable images are skipped and counted; classes without images are kept so labels line up."""

EXAMPLES = """examples:
  clipforge eval --model ViT-B/32 --task zeroshot --data imagenet/val --classnames imagenet1k --templates openai
  clipforge eval --model runs/tiny --task retrieval --data coco/dataset_coco.json --split test
  clipforge eval --model runs/tiny --task linear-probe --train-data shapes/train --data shapes/test --k-shot 4
  clipforge eval --model ViT-B/32 --task robustness --data imagenet/val --shifted v2=imagenetv2 sketch=sketch
  clipforge eval --model runs/tiny --task zeroshot --data shapes/test --precision int8   # beside --precision fp32"""

# command-line option -> (evaluator field, tasks that take it)
_OPTIONS = {
    "classnames": ("classnames", ("zeroshot", "linear-probe", "robustness")),
    "templates": ("templates", ("zeroshot", "robustness")),
    "split": ("split", ("retrieval",)),
    "image_root": ("image_root", ("retrieval",)),
    "train_data": ("train_data", ("linear-probe",)),
    "val_data": ("val_data", ("linear-probe",)),
    "k_shot": ("k_shot", ("linear-probe",)),
    "seed": ("seed", ("linear-probe",)),
    "shifted": ("shifted", ("robustness",)),
    "restrict_classes": ("restrict_classes", ("robustness",)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_model_options(parser)
    parser.add_argument("--task", required=True, choices=list(EVALUATORS))
    parser.add_argument("--data", required=True, help="the evaluation (test) set")
    parser.add_argument("--output", metavar="FILE.json", help="write the results here as JSON")
    parser.add_argument("--classnames", metavar="NAME|FILE", help="class names (see above)")
    parser.add_argument("--templates", metavar="NAME|FILE",
                        help="prompt templates: a set name (openai, cifar10, ...), a file (one per line, {} or {c}); "
                             "default: the set named like --classnames if there is one, else 'a photo of a {}.'")
    parser.add_argument("--split", default="test", help="Karpathy split for retrieval (default: test)")
    parser.add_argument("--image-root", help="folder the Karpathy JSON's image paths start from (default: its folder)")
    parser.add_argument("--train-data", help="linear-probe training split")
    parser.add_argument("--val-data", help="linear-probe validation split (default: 20%% of --train-data)")
    parser.add_argument("--k-shot", type=int, help="linear probe on K training images per class")
    parser.add_argument("--seed", type=int, default=None, help="seed of the validation split and k-shot draw (0)")
    parser.add_argument("--shifted", nargs="+", action="extend", metavar="NAME=PATH",
                        help="robustness: shifted versions of --data sharing its classes")
    parser.add_argument("--restrict-classes", action="store_true",
                        help="robustness: score each shifted set over only the classes it contains")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded at once (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="image-loading worker processes (default 0)")
    add_device_option(parser)
    add_precision_option(parser)


def _parse_shifted(items: list[str]) -> dict[str, str]:
    shifted = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--shifted {item!r}: expected NAME=PATH, e.g. sketch=imagenet-sketch/")
        if name in shifted:
            raise ValueError(f"--shifted: the name {name!r} is used twice")
        shifted[name] = path
    return shifted


def evaluator_options(args: argparse.Namespace) -> dict:
    """The evaluator's keyword arguments from the command line; ValueError for an option the task ignores."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    options = {"data": args.data, "batch_size": args.batch_size, "workers": args.workers}
    for attr, (name, tasks) in _OPTIONS.items():
        value = getattr(args, attr)
        if value in (None, False) or (attr == "split" and value == "test"):
            continue
        if args.task not in tasks:
            raise ValueError(f"--{attr.replace('_', '-')} does not apply to --task {args.task} "
                             f"(only to {', '.join(tasks)})")
        options[name] = _parse_shifted(value) if attr == "shifted" else value
    if args.task == "linear-probe" and "train_data" not in options:
        raise ValueError("--task linear-probe needs --train-data (the training split); --data is the test split")
    if args.task == "retrieval":
        options.setdefault("split", args.split)
    return options


def format_table(metrics: dict[str, float]) -> str:
    """Metrics as a two-column table."""
    width = max(len(name) for name in metrics) + 2
    lines = ["metric".ljust(width) + "value", "-" * (width + 8)]
    lines += [name.ljust(width) + f"{value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    spec = model_spec(args)  # an architecture without weights is refused before the data is read
    evaluator = get_evaluator(args.task, **evaluator_options(args))
    model, preprocess = load(spec, device=args.device, precision=args.precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluator.run(model, preprocess)
    for warning in caught:
        print(f"clipforge eval: warning: {warning.message}", file=sys.stderr)
    print(f"{args.task} on {args.data}")
    print(format_table(metrics))
    if evaluator.details.get("num_skipped_images"):
        print(f"skipped {evaluator.details['num_skipped_images']} unreadable images (listed in the JSON)",
              file=sys.stderr)
    if args.output:
        model_name = str(args.model) if args.pretrained is None else spec.text  # "ARCH:TAG" with --pretrained
        result = {"task": args.task, "model": model_name, "data": str(args.data), "metrics": metrics,
                  "details": evaluator.details}
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {output}")
    return 0
