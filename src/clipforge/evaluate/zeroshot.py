"""Zero-shot classification accuracy (CLIP paper sec. 3.1): top-1, top-5 and mean per-class recall of a
prompt-ensembled classifier built from the class names alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..zeroshot import build_zeroshot_classifier, load_templates, template_set_names
from .base import Evaluator
from ..data.classification import ClassificationData, read_classification
from .metrics import classification_metrics


def resolve_templates(templates, classnames=None) -> list[str]:
    """The templates to use: ``templates`` if given, else the set named like a shipped class-name set
    (``--classnames pets`` -> the ``pets`` templates), else the single default template."""
    if templates is None and isinstance(classnames, str) and classnames in template_set_names():
        return load_templates(classnames)
    return load_templates(templates)


def zeroshot_logits(evaluator: Evaluator, model, preprocess: Callable, data: ClassificationData,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine logits (N, C), targets (N,)) of the readable images of ``data`` against classifier ``weights``."""
    encoded = evaluator.encode(model, preprocess, data.images, data.source)
    targets = torch.tensor(data.targets, dtype=torch.long)[encoded.kept]
    return encoded.features @ weights.to(encoded.features.device), targets.to(encoded.features.device)


@dataclass(kw_only=True)
class ZeroShotEvaluator(Evaluator):
    """Zero-shot ``top1``, ``top5`` and ``mean_per_class_recall`` on a classification set.

    ``data``: an image folder, CSV or WebDataset shards (see :func:`read_classification`); ``classnames``:
    a shipped set name or mapping file; ``templates``: a set name, a file or a list.
    """

    data: str
    classnames: str | None = None
    templates: str | list[str] | None = None

    def run(self, model, preprocess: Callable) -> dict[str, float]:
        data = read_classification(self.data, self.classnames)
        templates = resolve_templates(self.templates, self.classnames)
        weights = build_zeroshot_classifier(model, data.classnames, templates)
        logits, targets = zeroshot_logits(self, model, preprocess, data, weights)
        self.details.update(num_images=len(targets), num_classes=len(data.class_keys), num_templates=len(templates))
        return classification_metrics(logits, targets)
