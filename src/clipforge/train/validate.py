"""Validation during training: the objective's own loss on held-out pairs and, for two-tower models,
image<->text recall@1/5/10 (the retrieval protocol of Radford et al. 2021, sec. 3.1.5), and zero-shot
accuracy from class names (sec. 3.1.4) -- on the built-in data, the colour-shape pairs never shown in training.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from clipforge.data import shapes
from clipforge.data.classnames import load_classnames
from clipforge.data.sources import SkipCounter, iter_pairs
from clipforge.encode import encode_images, encode_texts, model_device
from clipforge.evaluate.metrics import retrieval_metrics, topk_accuracy
from clipforge.loss import contrastive_loss
from clipforge.models import CLIP
from clipforge.objectives import prediction_loss, predictions
from clipforge.zeroshot import ZeroShotClassifier, build_zeroshot_classifier

HELDOUT = "builtin-heldout"
HELDOUT_SAMPLES = 512  # images of the held-out pairs scored for "builtin-heldout"
MAX_VAL_SAMPLES = 10_000
BUILTIN_VAL_SAMPLES = 1000
BUILTIN_VAL_SEED = 1  # the built-in training data is drawn with seed 0: validation sees new images


@dataclass
class ZeroShotSet:
    """Preprocessed images with integer labels into ``classnames``, and the prompt templates."""

    images: torch.Tensor  # (N, 3, H, W)
    labels: torch.Tensor  # (N,)
    classnames: list[str]
    templates: list[str] | None = None


@dataclass
class ValSet:
    """Preprocessed images and their tokenized captions (one caption per image), and caption texts."""

    images: torch.Tensor  # (N, 3, H, W)
    tokens: torch.Tensor  # (N, L)
    captions: list[str]


def load_val_pairs(spec: str, preprocess: Callable, tokenizer: Callable, max_samples: int = MAX_VAL_SAMPLES,
                   **source_options) -> ValSet:
    """The first ``max_samples`` good pairs of ``spec`` (bad samples skipped), preprocessed and tokenized."""
    images, captions = [], []
    for image, caption in _pairs(spec, **source_options):
        images.append(preprocess(image))
        captions.append(caption if isinstance(caption, str) else caption[0])  # several: the first, every time
        if len(images) == max_samples:
            break
    if len(images) < 2:
        raise ValueError(f"--val-data {spec}: found {len(images)} usable pairs, need at least 2")
    return ValSet(torch.stack(images), tokenizer(captions), captions)


def _pairs(spec: str, **source_options):
    """(image, caption) pairs of ``spec``; for ``builtin[:N][:STYLE]`` (or ``builtin-hard...``), new samples
    of the training pairs."""
    if not shapes.is_builtin_spec(spec):
        return iter_pairs(spec, counter=SkipCounter(), **source_options)
    try:
        builtin = shapes.parse_builtin_spec(spec)
    except ValueError as e:
        raise ValueError(f"--val-data {e}") from None
    data = builtin.dataset(BUILTIN_VAL_SAMPLES, "train", seed=BUILTIN_VAL_SEED)
    return (data[i] for i in range(len(data)))


def heldout_zeroshot_set(preprocess: Callable, image_size: int, num_samples: int = HELDOUT_SAMPLES,
                         seed: int = 0) -> ZeroShotSet:
    """Images of the built-in data's held-out colour-shape pairs, labelled by pair ("red triangle")."""
    data = shapes.ShapesDataset(num_samples, "heldout", seed=seed, image_size=image_size)
    images = torch.stack([preprocess(data.image(i)) for i in range(num_samples)])
    labels = torch.tensor([data.label(i) for i in range(num_samples)])
    return ZeroShotSet(images, labels, data.class_names(), shapes.templates())


def label_by_caption(captions: list[str], classnames: list[str]) -> list[int | None]:
    """The class each caption names (whole words, case-insensitive), or None when it names none or
    several; a name inside a longer matching name ("circle" in "red circle") does not count."""
    patterns = [re.compile(rf"\b{re.escape(name.lower())}\b") for name in classnames]
    labels = []
    for caption in captions:
        found = [k for k, p in enumerate(patterns) if p.search(caption.lower())]
        found = [k for k in found if not any(k != j and classnames[k].lower() in classnames[j].lower()
                                             for j in found)]
        labels.append(found[0] if len(found) == 1 else None)
    return labels


def zeroshot_from_val(val: ValSet, classes_file: str) -> ZeroShotSet:
    """Zero-shot set from validation pairs: each image labelled with the class its caption names."""
    return label_by_classnames(val, load_classnames(classes_file), f"--zeroshot-classes {classes_file}")


def label_by_classnames(val: ValSet, classnames: list[str], where: str) -> ZeroShotSet:
    """The validation images whose caption names exactly one of ``classnames``, labelled with it."""
    labels = label_by_caption(val.captions, classnames)
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        raise ValueError(f"{where}: no validation caption names exactly one of its {len(classnames)} classes, "
                         "so no image has a label")
    return ZeroShotSet(val.images[keep], torch.tensor([labels[i] for i in keep]), list(classnames))


@torch.no_grad()
def validate(model: CLIP, val: ValSet | None, zeroshot: ZeroShotSet | None, batch_size: int,
             autocast: Callable[[], ContextManager] = nullcontext) -> dict[str, float]:
    """``loss`` on ``val``, the model's own objective's averaged over batches of ``batch_size`` (for a two-tower
    model the contrastive loss, with ``image_to_text_recall@K`` and ``text_to_image_recall@K``, K = 1, 5, 10;
    for a classifier its cross-entropy on ``zeroshot``); ``zeroshot_top1``/``zeroshot_top5`` on ``zeroshot``."""
    metrics: dict[str, float] = {}
    if val is not None and model.objective == "contrastive":
        metrics.update(_pair_metrics(model, val, batch_size, autocast))
    elif val is not None and model.objective != "classify":
        metrics.update(_prediction_metrics(model, val, batch_size, autocast))
    if zeroshot is not None:
        metrics.update(_zeroshot_metrics(model, zeroshot, batch_size, autocast))
    return metrics


def _pair_metrics(model: CLIP, val: ValSet, batch_size: int, autocast) -> dict[str, float]:
    images = encode_images(model, val.images, batch_size, autocast)
    texts = encode_texts(model, val.tokens, batch_size=batch_size, autocast=autocast)
    scale = model.logit_scale.exp().float()
    losses = [contrastive_loss(images[i:i + batch_size], texts[i:i + batch_size], scale).item()
              for i in range(0, len(images), batch_size)]
    metrics = {"loss": sum(losses) / len(losses)}
    metrics.update(retrieval_metrics(images @ texts.T, torch.arange(len(texts))))
    metrics["val_samples"] = len(images)
    return metrics


def _prediction_metrics(model: CLIP, val: ValSet, batch_size: int, autocast) -> dict[str, float]:
    """The bag-of-words or captioning loss of the validation captions, teacher-forced."""
    device, losses = model_device(model), []
    for i in range(0, len(val.images), batch_size):
        images, tokens = val.images[i:i + batch_size].to(device), val.tokens[i:i + batch_size].to(device)
        with autocast():
            logits = predictions(model, images, tokens)
        losses.append(prediction_loss(model.objective, logits, tokens).item())
    return {"loss": sum(losses) / len(losses), "val_samples": len(val.images)}


def _zeroshot_metrics(model: CLIP, zeroshot: ZeroShotSet, batch_size: int, autocast) -> dict[str, float]:
    if model.objective == "contrastive":
        images = encode_images(model, zeroshot.images, batch_size, autocast)
        scores = images @ build_zeroshot_classifier(model, zeroshot.classnames, zeroshot.templates)
    else:
        classifier = ZeroShotClassifier(model, zeroshot.classnames, zeroshot.templates, batch_size=batch_size)
        with autocast():
            scores = classifier.scores(zeroshot.images).float().cpu()
    metrics = {f"zeroshot_{k}": v for k, v in topk_accuracy(scores, zeroshot.labels, (1, 5)).items()}
    if model.objective == "classify":
        metrics["loss"] = prediction_loss(model.objective, scores, zeroshot.labels).item()
    metrics["zeroshot_samples"] = len(zeroshot.images)
    metrics["zeroshot_classes"] = len(zeroshot.classnames)
    return metrics
