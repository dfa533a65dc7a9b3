"""Zero-shot classification accuracy (CLIP paper sec. 3.1): top-1, top-5 and mean per-class recall of a
prompt-ensembled classifier built from the class names alone (for any objective: see ``ZeroShotClassifier``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from clipforge.data.classification import ClassificationData, read_classification
from clipforge.evaluate.base import Evaluator
from clipforge.evaluate.metrics import classification_metrics
from clipforge.objectives import model_objective
from clipforge.zeroshot import ZeroShotClassifier, build_zeroshot_classifier, load_templates, template_set_names


def resolve_templates(templates, classnames=None) -> list[str]:
    """The templates to use: ``templates`` if given, else the set named like a shipped class-name set
    (``--classnames pets`` -> the ``pets`` templates), else the single default template."""
    if templates is None and isinstance(classnames, str) and classnames in template_set_names():
        return load_templates(classnames)
    return load_templates(templates)


def zeroshot_weights(model, classnames: list[str], templates: list[str]) -> torch.Tensor | ZeroShotClassifier:
    """A contrastive model's classifier weights (embed_dim, C); for the other objectives, which score
    images rather than features, a ``ZeroShotClassifier``."""
    if model_objective(model) == "contrastive":
        return build_zeroshot_classifier(model, classnames, templates)
    return ZeroShotClassifier(model, classnames, templates, allow_duplicates=True)


def zeroshot_logits(evaluator: Evaluator, model, preprocess: Callable, data: ClassificationData,
                    weights: torch.Tensor | ZeroShotClassifier,
                    columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(class scores (N, C), targets (N,)) of the readable images of ``data`` from ``zeroshot_weights``:
    cosine logits against weights, or the classifier's scores; only the classes ``columns`` if given."""
    if isinstance(weights, ZeroShotClassifier):
        encoded = evaluator.encode(weights.as_encoder(), preprocess, data.images, data.source, normalize=False)
        logits = encoded.features if columns is None else encoded.features[:, columns.to(encoded.features.device)]
    else:
        encoded = evaluator.encode(model, preprocess, data.images, data.source)
        logits = encoded.features @ (weights if columns is None else weights[:, columns]).to(encoded.features.device)
    targets = torch.tensor(data.targets, dtype=torch.long)[encoded.kept]
    return logits, targets.to(encoded.features.device)


@dataclass(kw_only=True)
class ZeroShotEvaluator(Evaluator):
    """Zero-shot ``top1``, ``top5`` and ``mean_per_class_recall`` on a classification set.

    ``data``: an image folder, CSV or WebDataset shards (see ``read_classification``); ``classnames``:
    a shipped set name or mapping file; ``templates``: a set name, a file or a list.
    """

    data: str
    classnames: str | None = None
    templates: str | list[str] | None = None

    def run(self, model, preprocess: Callable) -> dict[str, float]:
        data = read_classification(self.data, self.classnames)
        templates = resolve_templates(self.templates, self.classnames)
        weights = zeroshot_weights(model, data.classnames, templates)
        logits, targets = zeroshot_logits(self, model, preprocess, data, weights)
        self.details.update(num_images=len(targets), num_classes=len(data.class_keys), num_templates=len(templates))
        return classification_metrics(logits, targets)
