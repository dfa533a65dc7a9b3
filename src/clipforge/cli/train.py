"""``clipforge train``: contrastive pre-training or fine-tuning, or the paper's image-only baselines; also runs
under torchrun and SLURM srun."""
from __future__ import annotations

import argparse
import json

HELP = """Train or fine-tune a CLIP model on image-caption pairs, or an image-only model: --loss bow (predict the
caption's words), caption (generate it), classify (class labels of a labelled set).

Without --lr and --warmup they are fitted to the run: lr = 5e-4 from scratch, 3e-5 with --pretrained (each
times sqrt(global batch / 32768, resp. 512) for larger batches); warm-up = min(2 / (1 - beta2), a tenth of
the steps), i.e. 100 steps for long runs, 15 for a 150-step run.
--time-budget 20m replaces --epochs/--steps: the total steps are fixed after timing a few probe steps.

examples:
  clipforge train --model tiny-vit --train-data builtin --steps 300 --warmup 20 --lr 1.5e-3 \\
      --batch-size 32 --zeroshot-classes builtin-heldout --output runs/tiny
  torchrun --nproc_per_node 4 -m clipforge train --model ViT-B-32 --train-data 'shards/{00000..00999}.tar' \\
      --batch-size 256 --epochs 32 --precision bf16 --output runs/b32
  clipforge train --model tiny-vit --train-data my.csv --csv-caption-key caption_1,caption_2 \\
      --time-budget 10m --val-data val.csv --keep-best loss --output runs/mine
  clipforge train --model tiny-vit --loss bow --train-data builtin:20000 --steps 500 \
      --zeroshot-classes builtin-heldout --output runs/bow
  clipforge train --model tiny-vit --loss classify --train-data my_classes/ --steps 500 --output runs/sup
  clipforge train --config run.json --resume latest"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from clipforge.train.config import add_arguments as add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


def run(args: argparse.Namespace) -> int:
    from clipforge.cli.options import console_warnings
    from clipforge.train import train
    from clipforge.train.config import config_from_args

    with console_warnings("train"):
        result = train(config_from_args(args))
    summary = {"step": result["step"], "checkpoint": result["checkpoint"],
               "loss": result["train"].get("loss"), **{f"val_{k}": v for k, v in result["val"].items()}}
    if result["train"].get("skipped"):
        summary["skipped"] = result["train"]["skipped"]
    if result["rank"] == 0:
        print(json.dumps(summary))
    return 0
