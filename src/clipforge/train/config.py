"""The run configuration: one dataclass, its command-line options (``--dashed-names``) and an optional
JSON config file whose keys are the same names; command-line flags override the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.models.config import OBJECTIVES, PROJECTIONS
from clipforge.train.optim import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# --loss: the two-tower losses train a "contrastive" model (CLIP's softmax loss, SigLIP's sigmoid loss); each
# other loss is an image-only objective of the same name, with no text tower.
TWO_TOWER_LOSSES = ("contrastive", "sigmoid")
LOSSES = (*TWO_TOWER_LOSSES, *(o for o in OBJECTIVES if o != "contrastive"))
DEVICES = ("auto", "cpu", "cuda")


def objective_of(loss: str) -> str:
    """The model objective a training loss trains: "contrastive" for both two-tower losses, else the loss."""
    return "contrastive" if loss in TWO_TOWER_LOSSES else loss


def _opt(default: Any, help: str, type: Any = None, choices: tuple | None = None, metavar: str | None = None):
    """A TrainConfig field with the command-line help and parsing of its option."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "metavar": metavar})


@dataclass
class TrainConfig:
    """Everything a training run needs; ``clipforge train`` fills it from flags and ``--config FILE``."""

    # model
    model: str = _opt(None, "architecture name (clipforge.list_models()) or a model-config JSON file", str,
                       metavar="NAME|JSON")
    pretrained: str | None = _opt(None, "initial weights to fine-tune: a pretrained tag of --model (openai, "
                                  "laion2b_s34b_b79k, ...; clipforge.list_pretrained()), a checkpoint file or folder, "
                                  "a run directory (its newest checkpoint), RUN@best, or a model with weights "
                                  "(ViT-B/32, ViT-B-32:laion2b_s34b_b79k)", str, metavar="TAG|SPEC")
    lock_image: bool = _opt(False, "freeze the image tower (LiT: train the text tower only)")
    lock_text: bool = _opt(False, "freeze the text tower (a Hugging Face tower keeps its new projection trainable)")
    lock_text_unlocked_layers: int = _opt(0, "with --lock-text: leave the text tower's last N blocks trainable "
                                          "(OpenCLIP's option of that name)", int, metavar="N")
    grad_checkpointing: bool = _opt(False, "recompute activations in backward: less memory, one more forward pass")
    compile: bool = _opt(False, "torch.compile the model")
    # data
    train_data: str = _opt(None, "'builtin[:N]' (coloured shapes), a CSV file, an image folder or WebDataset "
                           "shards ('shards/{000..009}.tar'); several sources joined with '::'. --loss classify: a "
                           "labelled set (class folders, a CSV with a label column, .cls shards) or 'builtin[:N]' "
                           "labelled by colour-shape pair", str, metavar="SPEC")
    val_data: str | None = _opt(None, "validation data, same forms as --train-data", str, metavar="SPEC")
    classnames: str | None = _opt(None, "--loss classify: the names of --train-data's labels (one per line in "
                                  "label order, or a JSON object); needed for .cls shards, whose labels are "
                                  "numbers", str, metavar="FILE")
    zeroshot_classes: str | None = _opt(None, "class names for zero-shot validation: a file (one name per line) "
                                        "or 'builtin-heldout' (the built-in data's held-out colour-shape pairs)",
                                        str, metavar="FILE|builtin-heldout")
    train_num_samples: int | None = _opt(None, "samples per epoch, for WebDataset shards without a size file", int)
    resampled: bool = _opt(False, "WebDataset: draw shards with replacement (for weighted mixtures)")
    data_weights: str | None = _opt(None, "sampling weights of the '::'-joined sources, e.g. '1::3' "
                                    "(needs --resampled)", str, metavar="W::W")
    csv_img_key: str = _opt("filepath", "CSV column holding image paths", str, metavar="COLUMN")
    csv_caption_key: str = _opt("caption", "CSV column holding captions; several comma-separated columns, or a "
                                "JSON list in a cell, give an image several captions (one drawn per step)", str,
                                metavar="COLUMN[,COLUMN...]")
    csv_separator: str | None = _opt(None, "CSV field separator (default: tab for .tsv, else comma)", str,
                                     metavar="CHAR")
    augment: bool = _opt(True, "random square crops of the training images (the paper's only augmentation); "
                         "--no-augment trains on the evaluation preprocessing")
    workers: int = _opt(2, "data-loading worker processes per GPU/process", int)
    threads: int | None = _opt(None, "torch intra-op threads of each process (default: torch's choice, every core); "
                               "on a CPU, leave the data workers their cores (cores - --workers): threads that "
                               "wait for a busy core slow small models several-fold", int)
    # optimisation
    batch_size: int = _opt(64, "batch size per process (the global batch is this x processes x --accum-freq)", int)
    epochs: int | None = _opt(None, "number of passes over the training data (or give --steps)", int)
    steps: int | None = _opt(None, "number of optimiser steps (or give --epochs or --time-budget)", int)
    time_budget: str | None = _opt(None, "train for this wall time instead of --epochs/--steps ('90s', '20m', "
                                   "'2h'): the step time is measured on a few probe steps and the total fixed "
                                   "so that the run, its final checkpoint and validation end within it",
                                   str, metavar="DURATION")
    lr: float | None = _opt(None, "peak learning rate; default: the paper's 5e-4 from scratch, WiSE-FT's 3e-5 with "
                            "--pretrained, times sqrt(global batch / reference batch) above the references' "
                            "batches (32768 and 512; square-root scaling for Adam)", float, metavar="LR")
    warmup: int | None = _opt(None, "linear warm-up steps before the cosine decay; default: 2 / (1 - beta2) "
                              "(100 steps, Adam's untuned warm-up) but at most a tenth of the run", int,
                              metavar="STEPS")
    weight_decay: float = _opt(ADAMW_WEIGHT_DECAY, "AdamW weight decay (weight matrices only)", float)
    beta1: float = _opt(ADAMW_BETAS[0], "AdamW beta1", float)
    beta2: float = _opt(ADAMW_BETAS[1], "AdamW beta2", float)
    eps: float = _opt(ADAMW_EPS, "AdamW epsilon", float)
    grad_clip_norm: float | None = _opt(None, "clip the global gradient norm to this value", float)
    accum_freq: int = _opt(1, "accumulate K micro-batches per step, exactly (features cached, negatives "
                           "from the whole accumulated batch; bow/caption/classify: their per-sample means "
                           "weighted by each micro-batch's share)", int, metavar="K")
    precision: str = _opt("auto", "fp32; bf16 autocast; fp16 autocast with loss scaling (GPU); "
                          "auto = bf16 on a GPU that has it, else fp32", str, PRECISIONS)
    device: str = _opt("auto", "auto = a GPU per process when CUDA is available, else the CPU", str, DEVICES)
    # loss
    loss: str = _opt("contrastive", "CLIP's softmax contrastive loss, SigLIP's sigmoid loss, or an image-only "
                     "model: bow (predict the caption's bag of words), caption (a text decoder generating the "
                     "caption), classify (cross-entropy on class labels: --train-data is a labelled set)",
                     str, LOSSES)
    projection: str | None = _opt(None, "the towers' projection head: linear (CLIP) or mlp (linear, ReLU, "
                                  "linear; SimCLR's); default: the model config's", str, PROJECTIONS)
    fixed_temperature: float | None = _opt(None, "fix the softmax temperature at T (logit_scale = log(1/T), not "
                                           "learned); contrastive and sigmoid losses only", float, metavar="T")
    gather: bool = _opt(True, "with several processes, use the negatives of all ranks (all-gather with "
                        "gradients); --no-gather keeps each rank's batch separate")
    local_loss: bool = _opt(False, "with --gather: each rank computes only its own rows and columns "
                            "(memory linear in the global batch, same gradients)")
    loss_tile_size: int | None = _opt(None, "compute the contrastive loss in N x N tiles (memory-efficient)",
                                      int, metavar="N")
    # run
    output: str = _opt(None, "run directory: run_config.json, metrics.jsonl, checkpoints/", str, metavar="DIR")
    seed: int = _opt(0, "random seed (model init, data order, augmentation)", int)
    resume: str | None = _opt(None, "'latest' (newest checkpoint in --output), 'auto' (latest if there is one, "
                              "else start) or a checkpoint folder; default 'auto' after a torchrun restart",
                              str, metavar="latest|auto|PATH")
    save_every: int = _opt(1000, "write a checkpoint every N steps (and at the end)", int, metavar="N")
    keep: int = _opt(3, "keep the newest K checkpoints", int, metavar="K")
    keep_best: str | None = _opt(None, "also keep the checkpoint with the best value of this validation metric "
                                 "(e.g. zeroshot_top1, val_loss; ':min' or ':max' to say which is best, else "
                                 "inferred: losses and ranks lower, the rest higher), as checkpoints/best; "
                                 "clipforge.load('RUN@best') loads it", str, metavar="METRIC[:min|max]")
    log_every: int = _opt(10, "append a metrics.jsonl record every N steps", int, metavar="N")
    val_every: int | None = _opt(None, "validate every N steps (always at the end when --val-data or "
                                 "--zeroshot-classes is given)", int, metavar="N")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Check values that need no file system or device; raise ValueError naming the option."""
        for name in ("model", "train_data", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{_dashed(name)} is required")
        lengths = [f"--{_dashed(n)} {getattr(self, n)}" for n in ("epochs", "steps", "time_budget")
                   if getattr(self, n) is not None]
        if len(lengths) != 1:
            raise ValueError("give exactly one of --epochs, --steps and --time-budget"
                             + (f" (got {' and '.join(lengths)})" if lengths else ""))
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        for name in ("batch_size", "accum_freq", "keep", "log_every", "save_every", "epochs", "steps",
                     "val_every", "loss_tile_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{_dashed(name)} must be a positive integer, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {self.threads}")
        for name in ("workers", "warmup", "lock_text_unlocked_layers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{_dashed(name)} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"--grad-clip-norm must be positive, got {self.grad_clip_norm}")
        if self.lock_image and self.lock_text:
            raise ValueError("--lock-image and --lock-text together leave nothing to train; drop one")
        if self.loss != "contrastive" and (self.local_loss or self.loss_tile_size):
            raise ValueError(f"--local-loss and --loss-tile-size apply to the contrastive loss, not --loss {self.loss}")
        self._validate_objective()
        if self.local_loss and not self.gather:
            raise ValueError("--local-loss needs --gather (it splits the gathered global batch over ranks)")
        if self.keep_best and not (self.val_data or self.zeroshot_classes):
            raise ValueError(f"--keep-best {self.keep_best} needs validation: give --val-data or --zeroshot-classes")
        if self.data_weights and not self.resampled:
            raise ValueError("--data-weights needs --resampled (weights are sampling probabilities)")
        for name, choices in (("precision", PRECISIONS), ("loss", LOSSES), ("device", DEVICES),
                              ("projection", (None, *PROJECTIONS))):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {', '.join(c for c in choices if c)}, "
                                 f"got {getattr(self, name)!r}")
        return self

    def _validate_objective(self) -> None:
        """The options that only some objectives have: a temperature, a text tower, pair-wise zero-shot."""
        if self.fixed_temperature is not None and not self.fixed_temperature > 0:
            raise ValueError(f"--fixed-temperature must be positive, got {self.fixed_temperature}")
        if self.classnames and self.loss != "classify":
            raise ValueError(f"--classnames names the labels of a --loss classify run's data; --loss {self.loss} "
                             "trains on captions")
        if self.loss in TWO_TOWER_LOSSES:
            return
        if self.fixed_temperature is not None:
            raise ValueError(f"--fixed-temperature applies to --loss contrastive and sigmoid; a --loss {self.loss} "
                             "model has no temperature (its logits are not scaled similarities)")
        if self.lock_text:
            raise ValueError(f"--lock-text: a --loss {self.loss} model has no text tower to lock")
        if self.loss == "classify" and self.zeroshot_classes:
            raise ValueError(f"--loss classify with --zeroshot-classes {self.zeroshot_classes}: a classifier scores "
                             "only its own classes (never held-out pairs); validate with --val-data, whose images "
                             "are labelled by the class their caption names")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smh])")
_SECONDS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``90s``, ``20m``, ``1.5h`` (a bare number is seconds)."""
    match = _DURATION.fullmatch(text.strip().lower() + ("s" if text.strip().replace(".", "").isdigit() else ""))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--time-budget {text!r}: expected a positive duration such as 90s, 20m or 2h")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _dashed(name: str) -> str:
    return name.replace("_", "-")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--dashed-name`` option per TrainConfig field, plus ``--config FILE``.

    Defaults are left out of the namespace (``argparse.SUPPRESS``) so that ``config_from_args`` can
    tell flags given on the command line from values of the config file.
    """
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="JSON file of options (keys: the option names, dashed or with underscores); "
                             "command-line flags override it")
    for name, f in _FIELDS.items():
        meta = f.metadata
        help_text = meta["help"] + (f" (default: {f.default})" if f.default not in (None, False) else "")
        kwargs = {"default": argparse.SUPPRESS, "help": help_text, "dest": name}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            metavar = meta["metavar"] or {int: "N", float: "X"}.get(meta["type"])
            kwargs.update(type=meta["type"], choices=meta["choices"], metavar=metavar)
        parser.add_argument(f"--{_dashed(name)}", **kwargs)


def _coerce(name: str, value: Any, source: str) -> Any:
    f = _FIELDS[name]
    if value is None:
        return None
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {name!r} must be true or false, got {value!r}")
        return value
    kind = f.metadata["type"]
    try:
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name!r} must be {kind.__name__}, got {value!r}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a JSON object whose keys are option names (``"batch-size"`` or ``"batch_size"``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a JSON object of options, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in _FIELDS:
            raise ValueError(f"--config {path}: unknown option {key!r}; options: "
                             + ", ".join(_dashed(n) for n in _FIELDS))
        values[name] = _coerce(name, value, f"--config {path}")
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags: dataclass defaults < ``--config`` file < command-line flags."""
    given = {k: v for k, v in vars(args).items() if k in _FIELDS}
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given)
    return TrainConfig(**values).validate()


def default_resume(environ: os._Environ | dict | None = None) -> str | None:
    """'auto' inside a torchrun restart (``TORCHELASTIC_RESTART_COUNT`` > 0), so elastic restarts resume."""
    env = os.environ if environ is None else environ
    return "auto" if int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 else None
