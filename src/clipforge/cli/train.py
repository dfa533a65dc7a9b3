"""``clipforge train``: contrastive pre-training or fine-tuning; also runs under torchrun and SLURM srun."""
from __future__ import annotations

import argparse
import json

HELP = """Train or fine-tune a CLIP model on image-caption pairs.

examples:
  clipforge train --model tiny-vit --train-data builtin --steps 300 --warmup 20 --lr 1.5e-3 \\
      --batch-size 32 --zeroshot-classes builtin-heldout --output runs/tiny
  torchrun --nproc_per_node 4 -m clipforge train --model ViT-B-32 --train-data 'shards/{00000..00999}.tar' \\
      --batch-size 256 --epochs 32 --precision bf16 --output runs/b32
  clipforge train --config run.json --resume latest"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from clipforge.train.config import add_arguments as add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


def run(args: argparse.Namespace) -> int:
    from clipforge.train import train
    from clipforge.train.config import config_from_args

    result = train(config_from_args(args))
    summary = {"step": result["step"], "checkpoint": result["checkpoint"],
               "loss": result["train"].get("loss"), **{f"val_{k}": v for k, v in result["val"].items()}}
    if result["rank"] == 0:
        print(json.dumps(summary))
    return 0
