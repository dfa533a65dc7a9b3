"""Evaluation behind one interface: ``evaluate(model, preprocess, task, **options) -> {metric: fraction}``.

Tasks: ``zeroshot`` (top1, top5, mean_per_class_recall), ``retrieval`` (image_to_text_recall@K,
text_to_image_recall@K), ``linear-probe`` (top1, ...) and ``robustness`` (top1 per shifted set and drops).
"""
from __future__ import annotations

from typing import Callable

from clipforge.evaluate.base import Evaluator
from clipforge.evaluate.linear_probe import LinearProbeEvaluator
from clipforge.evaluate.retrieval import RetrievalEvaluator
from clipforge.evaluate.robustness import RobustnessEvaluator
from clipforge.evaluate.zeroshot import ZeroShotEvaluator

EVALUATORS: dict[str, type[Evaluator]] = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "linear-probe": LinearProbeEvaluator,
    "robustness": RobustnessEvaluator,
}


def get_evaluator(task: str, **options) -> Evaluator:
    """The evaluator for ``task`` configured with ``options`` (its dataclass fields, e.g. ``data=...``)."""
    if task not in EVALUATORS:
        raise ValueError(f"unknown evaluation task {task!r}; choose one of {', '.join(EVALUATORS)}")
    return EVALUATORS[task](**options)


def evaluate(model, preprocess: Callable, task: str, **options) -> dict[str, float]:
    """Run one evaluation task on ``model`` and return its named metrics (fractions in [0, 1])."""
    return get_evaluator(task, **options).run(model, preprocess)


__all__ = ["EVALUATORS", "Evaluator", "LinearProbeEvaluator", "RetrievalEvaluator", "RobustnessEvaluator",
           "ZeroShotEvaluator", "evaluate", "get_evaluator"]
