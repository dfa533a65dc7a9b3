"""The options every subcommand shares, each defined once with one help text: the model (``--model``,
``--pretrained``, ``--random-init``, read by the model-spec rule of ``clipforge.io.spec``), ``--device``,
``--precision``, ``--json``, the image decoding of ``index`` and ``embed``; and loading the model the parsed options name."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Callable, Iterator

import torch

from clipforge.io.factory import PRECISIONS, load
from clipforge.io.spec import ModelSpec, resolve_spec
from clipforge.search.model import PRECISIONS as INDEX_PRECISIONS

MODEL_HELP = ("the model: a name with weights (ViT-B/32, RN50, ...), an architecture and pretrained tag in one "
              "string (ViT-H-14:laion2b_s32b_b79k), a saved model folder or checkpoint file, a training run "
              "directory (its newest checkpoint) or RUN@best. An architecture without weights (ViT-H-14, "
              "tiny-vit) is refused unless --random-init asks for random weights")
PRETRAINED_HELP = ("weights for --model's architecture: an OpenCLIP pretrained tag (laion2b_s32b_b79k; "
                   "clipforge.list_pretrained() lists them), 'openai', or a checkpoint / run directory")
RANDOM_INIT_HELP = ("seed-0 random weights for --model's architecture (a name or model-config JSON), instead of "
                    "any published or saved weights: for tests and demos")
DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: cuda when available)"
JSON_HELP = "print the result as JSON instead of text"
PRECISION_HELP = ("the model's numeric precision: fp32, fp16 or bf16, or int8 (CPU only: int8 linear layers in both "
                  "towers, faster, features within a cosine of about 0.99 of fp32's; check a model by running the "
                  "same command with --precision fp32). Default: fp16 on a GPU, fp32 on the CPU")


def add_model_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model SPEC``, ``--pretrained TAG`` and ``--random-init``."""
    parser.add_argument("--model", required=required, metavar="SPEC", help=MODEL_HELP)
    parser.add_argument("--pretrained", metavar="TAG|PATH", help=PRETRAINED_HELP)
    parser.add_argument("--random-init", action="store_true", help=RANDOM_INIT_HELP)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs."""
    parser.add_argument("--device", help=DEVICE_HELP)


INDEX_PRECISION_HELP = {
    "index": "how images and captions are encoded: fp32, or int8 (CPU only: int8 linear layers, faster, vectors "
             "within a cosine of about 0.99 of fp32's). The index records it and holds one kind. Default: the "
             "existing index's, else fp32",
    "embed": "how images and captions are encoded: fp32, or int8 (CPU only: int8 linear layers, faster, vectors "
             "within a cosine of about 0.99 of fp32's; recorded in embeddings.json). Default: fp32",
    "queries": "how text and image queries are encoded: fp32 or int8 (CPU only). Default: as the index's vectors "
               "were (fp32 on a GPU); the other one is allowed, and said once, since results can differ slightly",
}


def add_precision_option(parser: argparse.ArgumentParser, role: str | None = None) -> None:
    """``--precision``: the model's weights and arithmetic (``clipforge.load``'s ``precision``); for ``role``
    "index", "embed" or "queries", the precisions an index's vectors and queries take (fp32, int8)."""
    if role is None:
        parser.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    else:
        parser.add_argument("--precision", choices=INDEX_PRECISIONS, help=INDEX_PRECISION_HELP[role])


def add_json_option(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup) -> None:
    """``--json``: machine-readable output (its shape is described in the command's help)."""
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The model the parsed options name, by the model-spec rule; reads and downloads nothing. Raises
    ``clipforge.io.spec.NoWeightsError`` (a ValueError) for an architecture without weights."""
    return resolve_spec(args.model, args.pretrained, args.random_init)


def load_model(args: argparse.Namespace, **options) -> tuple[torch.nn.Module, Callable]:
    """(model in eval mode, preprocessing) that the parsed options name, on ``--device`` in ``--precision``
    where the command has them (``options``: ``clipforge.load``'s others, or these explicitly)."""
    options.setdefault("device", getattr(args, "device", None))
    options.setdefault("precision", getattr(args, "precision", None))
    return load(model_spec(args), **options)


def add_nprobe_option(parser: argparse.ArgumentParser) -> None:
    """``--nprobe``: the cells a folder index's approximate (faiss) index probes per query."""
    parser.add_argument("--nprobe", type=int, metavar="N",
                        help="cells the approximate index probes per query (a folder index; default: the number "
                             "its build tuned, in config.json): fewer is faster and may miss neighbours")


@contextlib.contextmanager
def console_warnings(command: str) -> Iterator[None]:
    """Within the block, a warning prints as one line, ``clipforge COMMAND: warning: MESSAGE``, on stderr (once
    per place it is raised from, Python's default), rather than with the file and line that raised it."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_args, **_kwargs: print(
            f"clipforge {command}: warning: {message}", file=sys.stderr, flush=True)
        yield


def default_workers() -> int:
    """DataLoader processes decoding images: one core is left to encoding (at least 1, at most 8)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """How ``index`` and ``embed`` list, decode and encode images: ``--exclude``, ``--batch-size``,
    ``--workers``, ``--threads``, ``--max-pixels``, ``--fast-decode``."""
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="leave out folder paths matching GLOB (relative to the folder; repeatable)")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded at once (default 64)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help=f"DataLoader processes decoding images (default {default_workers()}: cores - 1)")
    parser.add_argument("--threads", type=int, help="torch threads for encoding (default: all cores)")
    parser.add_argument("--max-pixels", type=int, help="skip images with more pixels (default 89,478,485)")
    parser.add_argument("--fast-decode", action="store_true",
                        help="decode JPEGs at reduced scale (draft mode): faster, slightly different vectors")
