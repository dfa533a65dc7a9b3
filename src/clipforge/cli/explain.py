"""``clipforge explain``: show how CLIP scores images against texts, as tables and a PNG heatmap."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipforge.cli.classify import read_images
from clipforge.cli.options import add_device_option, add_model_options, load_model
from clipforge.data.classnames import read_text_lines
from clipforge.evaluate.explain import explanation, format_report, plot_report, similarity_report

HELP = """Show, for some images and texts, every step of CLIP's scoring: the cosine similarity of each
image-text pair, the temperature-scaled logits, the softmax over the texts and the chosen text, with a
plain-language explanation. --output also draws them as a PNG heatmap (texts on the y axis, image
thumbnails along the top, values in the cells, the chosen text outlined), like the figure in OpenAI's
CLIP notebook; plotting needs matplotlib (pip install 'clipforge[plot]').

Unreadable images are skipped with a message on stderr; the exit status is 1 if none could be read."""

EXAMPLES = """example:
  clipforge explain dog.jpg cat.jpg --texts "a photo of a dog" "a photo of a cat" --model ViT-B/32 \\
      --output similarity.png"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    texts = parser.add_mutually_exclusive_group(required=True)
    texts.add_argument("--texts", nargs="+", metavar="TEXT", help="candidate texts, one argument each")
    texts.add_argument("--texts-file", metavar="FILE", help="a file with one candidate text per line")
    add_model_options(parser)
    parser.add_argument("--output", metavar="FILE.png", help="write the heatmap figure here")
    add_device_option(parser)


def _texts(args: argparse.Namespace) -> list[str]:
    if args.texts is not None:
        texts = [t.strip() for t in args.texts]
    else:
        path = Path(args.texts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--texts-file {path} does not exist")
        texts = [line.strip() for line in read_text_lines(path, "--texts-file")]
    if not texts or any(not t for t in texts):
        raise ValueError("explain needs one or more non-empty texts (--texts \"a dog\" \"a cat\")")
    return texts


def run(args: argparse.Namespace) -> int:
    texts = _texts(args)
    model, preprocess = load_model(args)
    paths, images, batch, errors = read_images(args.images, preprocess)
    for message in errors:
        print(f"clipforge explain: skipped {message}", file=sys.stderr)
    if batch is None:
        print(f"clipforge explain: none of the {len(args.images)} images could be read", file=sys.stderr)
        return 1
    report = similarity_report(model, batch, texts, paths)
    print(format_report(report))
    print()
    print(explanation(report))
    if args.output:
        thumbnails = [image.convert("RGB") for image in images]
        print(f"\nwrote {plot_report(report, thumbnails, args.output)}")
    return 0
