"""``clipforge classify``: zero-shot classify image files against labels given on the command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from clipforge.cli.options import (
    add_device_option,
    add_json_option,
    add_model_options,
    add_precision_option,
    load_model,
)
from clipforge.data.classnames import check_classnames, classname_set_names, load_classnames
from clipforge.data.images import load_image
from clipforge.zeroshot import ZeroShotClassifier, load_templates

HELP = """Zero-shot classify images against labels you name, as in CLIP's README example.

Each label is put into the prompt templates (default "a photo of a {}."; --no-template, the same as
--templates '{}', scores each label's text as given, as OpenAI's README example does), the prompt embeddings are
averaged per label, and each image gets softmax(exp(logit_scale) * cosine(image, label)) over the labels:
the probabilities of one image sum to 1. --json prints one object per image, best label first.

--multi-label scores every label on its own instead: the two-way softmax between the label and a neutral
label (--negative, default "thing", through the same templates), i.e.
sigmoid(exp(logit_scale) * (cosine(image, label) - cosine(image, neutral))). A score above 0.5 means the
image is closer to the label than to a generic object; scores of one image need not sum to 1.

Unreadable images are skipped with a message on stderr. Exit status: 0 if at least one image was
classified, 1 if none could be read, 2 for bad arguments (empty or duplicate labels, a template
without a placeholder, an unknown model)."""

EXAMPLES = """examples:
  clipforge classify CLIP.png --model ViT-B/32 --labels "a diagram,a dog,a cat" --no-template
  clipforge classify photos/*.jpg --model runs/tiny --classes labels.txt --templates openai --json
  clipforge classify street.jpg --model ViT-B/32 --labels "car,bicycle,person,tree" --multi-label
  clipforge classify photos/*.jpg --model ViT-B/32 --labels "a dog,a cat" --precision int8"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_model_options(parser)
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated labels, e.g. "a diagram,a dog,a cat"')
    labels.add_argument("--classes", metavar="FILE|NAME",
                        help="a file with one label per line, or a shipped class list (imagenet1k, pets, ...)")
    templates = parser.add_mutually_exclusive_group()
    templates.add_argument("--no-template", action="store_true",
                           help="score each label's text as given (the identity template '{}')")
    templates.add_argument("--templates", metavar="NAME|FILE",
                           help='prompt templates: a set name (openai = 80 ImageNet prompts, cifar10, food101, ...), '
                                'a file with one template per line using {} or {c}, or one template; '
                                'default "a photo of a {}."')
    parser.add_argument("--top-k", type=int, default=None,
                        help="labels shown per image (default 5; all labels with --multi-label)")
    parser.add_argument("--multi-label", action="store_true", help="score each label on its own (see above)")
    parser.add_argument("--negative", default="thing", help="the neutral label for --multi-label (default: thing)")
    add_json_option(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images encoded at once (default 32)")
    add_device_option(parser)
    add_precision_option(parser)


def parse_labels(text: str) -> list[str]:
    """Labels from a comma-separated string; ValueError for an empty or repeated label."""
    return check_classnames([part.strip() for part in text.split(",")], "--labels")


def read_images(paths: list[str], preprocess: Callable) -> tuple[list[str], list, torch.Tensor | None, list[str]]:
    """(readable paths, their PIL images, preprocessed batch (N, 3, H, W) or None, one message per unreadable)."""
    kept, images, tensors, errors = [], [], [], []
    for path in paths:
        try:
            image = load_image(path)
            tensors.append(preprocess(image))
        except (OSError, ValueError) as e:
            errors.append(str(e) if path in str(e) else f"{path}: {e}")
            continue
        kept.append(path)
        images.append(image)
    return kept, images, (torch.stack(tensors) if tensors else None), errors


def _report_skipped(command: str, errors: list[str]) -> None:
    for message in errors:
        print(f"clipforge {command}: skipped {message}", file=sys.stderr)


def _print_text(paths: list[str], predictions: list[list[tuple[str, float]]], multi_label: bool) -> None:
    for path, preds in zip(paths, predictions):
        print(f"{path}{'  (independent per-label scores)' if multi_label else ''}")
        for label, p in preds:
            print(f"  {100 * p:6.2f}%  {label}")


def run(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels) if args.labels is not None else load_classnames(args.classes)
    templates = ["{}"] if args.no_template else load_templates(args.templates)
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    model, preprocess = load_model(args)
    classifier = ZeroShotClassifier(model, labels, templates, negative=args.negative,
                                    allow_duplicates=args.classes in classname_set_names())
    top_k = args.top_k or (len(labels) if args.multi_label else 5)
    paths, predictions = [], []
    for start in range(0, len(args.images), args.batch_size):
        kept, _, batch, errors = read_images(args.images[start:start + args.batch_size], preprocess)
        _report_skipped("classify", errors)
        if batch is not None:
            paths += kept
            predictions += classifier.predict(batch, top_k, multi_label=args.multi_label)
    if not paths:
        print(f"clipforge classify: none of the {len(args.images)} images could be read", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"image": path, "predictions": [{"label": label, "probability": p} for label, p in preds]}
                          for path, preds in zip(paths, predictions)], indent=2))
    else:
        _print_text(paths, predictions, args.multi_label)
    return 0
