"""Robustness to distribution shift (CLIP paper sec. 3.3): one zero-shot classifier over a base set and its
shifted versions (ImageNet -> ImageNetV2, -R, -Sketch, ...), reporting each accuracy and its drop from the base.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from clipforge.data.classification import ClassificationData, read_classification
from clipforge.evaluate.base import Evaluator
from clipforge.evaluate.metrics import topk_accuracy
from clipforge.evaluate.zeroshot import resolve_templates, zeroshot_logits, zeroshot_weights


def _align(base: ClassificationData, shifted: ClassificationData, name: str) -> torch.Tensor:
    """For each class of ``shifted``, its index among the base classes: matched by class key (folder name,
    label) when the base has them all, else by class name (e.g. a CSV's labelled classes against folders)."""
    for base_ids, shifted_ids in ((base.class_keys, shifted.class_keys), (base.classnames, shifted.classnames)):
        index = {k: i for i, k in enumerate(base_ids)}
        if all(k in index for k in shifted_ids) and len(index) == len(base_ids):
            return torch.tensor([index[k] for k in shifted_ids], dtype=torch.long)
    unknown = [n for n in shifted.classnames if n not in set(base.classnames)]
    raise ValueError(f"shifted set {name!r} ({shifted.source}) has classes {unknown[:5]} that the base set "
                     f"{base.source} lacks; shifted sets must share the base set's class folders or class names")


@dataclass(kw_only=True)
class RobustnessEvaluator(Evaluator):
    """``top1`` on the base set, ``<name>/top1`` and ``<name>/drop`` (base minus shifted) per shifted set,
    and ``mean_shifted_top1``.

    ``shifted`` maps a name to a dataset path; classes are matched to the base set by key or name. With
    ``restrict_classes`` each shifted set is scored over only the classes it contains (as the paper does for
    the 200-class ImageNet-R and -A); otherwise over all base classes.
    """

    data: str
    shifted: dict[str, str] = field(default_factory=dict)
    classnames: str | None = None
    templates: str | list[str] | None = None
    restrict_classes: bool = False

    def run(self, model, preprocess: Callable) -> dict[str, float]:
        if not self.shifted:
            raise ValueError("robustness needs at least one shifted set (--shifted NAME=PATH)")
        base = read_classification(self.data, self.classnames)
        weights = zeroshot_weights(model, base.classnames, resolve_templates(self.templates, self.classnames))
        logits, targets = zeroshot_logits(self, model, preprocess, base, weights)
        metrics = {"top1": topk_accuracy(logits, targets, (1,))["top1"]}
        self.details["num_images"] = {"base": len(targets)}
        for name, path in self.shifted.items():
            metrics[f"{name}/top1"] = self._shifted_top1(model, preprocess, base, weights, name, path)
            metrics[f"{name}/drop"] = metrics["top1"] - metrics[f"{name}/top1"]
        metrics["mean_shifted_top1"] = sum(metrics[f"{n}/top1"] for n in self.shifted) / len(self.shifted)
        return metrics

    def _shifted_top1(self, model, preprocess, base: ClassificationData, weights, name: str, path: str) -> float:
        shifted = read_classification(path, self.classnames)
        to_base = _align(base, shifted, name)
        present = to_base[torch.tensor(sorted(set(shifted.targets)), dtype=torch.long)]
        columns = present if self.restrict_classes else torch.arange(len(base.classnames))
        logits, targets = zeroshot_logits(self, model, preprocess, shifted, weights, columns)
        base_targets = to_base[targets.cpu()]  # shifted class index -> base class index
        position = torch.full((len(base.classnames),), -1, dtype=torch.long)
        position[columns] = torch.arange(len(columns))  # base class index -> column in the logits
        self.details["num_images"][name] = len(targets)
        return topk_accuracy(logits, position[base_targets].to(logits.device), (1,))["top1"]
