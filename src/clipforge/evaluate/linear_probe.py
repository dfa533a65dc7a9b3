"""Linear-probe evaluation (CLIP paper sec. 3.2, appendix A.3): L-BFGS logistic regression on frozen image
features, with the L2 strength searched on a validation split over [1e-6, 1e6], then refit on train + val.

The objective is ``sum_i CE_i + (l2 / 2) * ||W||^2`` (bias not penalised): scikit-learn's
``LogisticRegression(C=1/l2)``, which the paper used, solved here with ``torch.optim.LBFGS`` in float64.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from clipforge.data.classification import ClassificationData, read_classification
from clipforge.evaluate.base import Evaluator
from clipforge.evaluate.metrics import classification_metrics
from clipforge.runtime.threads import single_intraop_thread

L2_RANGE = (1e-6, 1e6)
SMALL_PROBLEM = 1 << 20  # feature-matrix elements below which the fit runs single-threaded


@dataclass
class LinearClassifier:
    """``logits = features @ weight + bias``; weight (D, C), bias (C,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight) @ self.weight + self.bias


def logistic_objective(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
                       l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_i CE_i + l2/2 * ||W||^2) / N`` (scikit-learn's penalised loss with ``C = 1/l2``, divided by N)
    and its gradients with respect to weight and bias, written out (much cheaper than autograd here)."""
    n = features.shape[0]
    logits = features @ weight + bias  # (N, C)
    loss = (F.cross_entropy(logits, targets, reduction="sum") + 0.5 * l2 * weight.pow(2).sum()) / n
    residual = logits.softmax(dim=-1)
    residual[torch.arange(n), targets] -= 1  # dCE/dlogits = softmax - one_hot
    return loss, (features.t() @ residual + l2 * weight) / n, residual.sum(dim=0) / n


def _single_thread_if_small(numel: int):
    """Run small problems on one CPU thread: L-BFGS makes thousands of tiny tensor calls, and synchronising
    intra-op threads for each costs far more than the arithmetic, worst when other processes hold cores."""
    return single_intraop_thread() if numel < SMALL_PROBLEM else nullcontext()


@torch.no_grad()
def fit_logistic_regression(features: torch.Tensor, targets: torch.Tensor, num_classes: int, l2: float,
                            max_iter: int = 1000, init: LinearClassifier | None = None) -> LinearClassifier:
    """Minimise ``logistic_objective`` with full-batch L-BFGS (strong Wolfe line search)."""
    x = features.double()
    weight = init.weight.clone() if init else torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device)
    bias = init.bias.clone() if init else torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-4,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        loss, weight.grad, bias.grad = logistic_objective(weight, bias, x, targets, l2)
        return loss

    with _single_thread_if_small(x.numel()):
        optimizer.step(closure)
    return LinearClassifier(weight, bias)


def _score(model: LinearClassifier, features: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(accuracy, -mean cross-entropy): higher is better, the loss breaking accuracy ties."""
    logits = model.logits(features.double())
    accuracy = (logits.argmax(dim=-1) == targets).double().mean().item()
    return accuracy, -F.cross_entropy(logits, targets).item()


def select_l2(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              num_classes: int, refinements: int = 3, max_iter: int = 1000) -> tuple[float, list[tuple[float, float]]]:
    """The L2 strength with the best validation accuracy, and the (l2, accuracy) pairs tried.

    A sweep over 1e-6, 1e-4, ..., 1e6, then ``refinements`` rounds of a log-space bisection around the best.
    """
    scores: dict[float, tuple[float, float]] = {}
    previous: LinearClassifier | None = None

    def score(exponent: float) -> tuple[float, float]:
        nonlocal previous
        if exponent not in scores:  # warm start from the last fit: neighbouring strengths have close optima
            previous = fit_logistic_regression(train_x, train_y, num_classes, 10.0 ** exponent, max_iter, previous)
            scores[exponent] = _score(previous, val_x, val_y)
        return scores[exponent]

    low, high = (math.log10(v) for v in L2_RANGE)
    for exponent in torch.arange(high, low - 1, -2.0).tolist():  # strong to weak: the warm starts stay tame
        score(exponent)
    best, step = max(scores, key=lambda e: (scores[e], e)), 1.0
    for _ in range(refinements):
        candidates = [e for e in (best - step, best, best + step) if low <= e <= high]
        best = max(candidates, key=lambda e: (score(e), e))
        step /= 2
    return 10.0 ** best, [(10.0 ** e, s[0]) for e, s in sorted(scores.items())]


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: per class, a seeded ``fraction`` of the samples (at least 1 if it has 2) to val."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(len(members) - 1, max(1, round(fraction * len(members))))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def sample_k_shot(targets: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of ``k`` samples per class, drawn deterministically with ``seed`` (all of a smaller class)."""
    generator = torch.Generator().manual_seed(seed)
    chosen, short = [], []
    for c in targets.unique().tolist():
        members = (targets == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
        if len(members) < k:
            short.append(c)
    if short:
        warnings.warn(f"{len(short)} classes have fewer than {k} training images; using all of theirs", stacklevel=2)
    return torch.cat(chosen).sort().values


def _targets_in(train: ClassificationData, other: ClassificationData) -> torch.Tensor:
    """For each class of ``other``, its index among the training classes (matched by class key)."""
    index = {k: i for i, k in enumerate(train.class_keys)}
    unknown = [k for k in other.class_keys if k not in index]
    if unknown:
        raise ValueError(f"{other.source} has classes {unknown[:5]} missing from the training set {train.source}")
    return torch.tensor([index[k] for k in other.class_keys], dtype=torch.long)


@dataclass(kw_only=True)
class LinearProbeEvaluator(Evaluator):
    """Linear-probe ``top1``, ``top5`` and ``mean_per_class_recall`` on ``data`` (the test split).

    Trains on ``train_data``; the L2 strength is chosen on ``val_data`` or, without it, on a seeded stratified
    ``val_fraction`` of the training split; the final probe is refit on train + val. ``k_shot`` keeps K seeded
    images per class of the training part (the validation images only choose the L2 strength).
    Features are the model's raw (unnormalised) image embeddings, as in OpenAI's linear-probe example.
    """

    data: str
    train_data: str
    val_data: str | None = None
    classnames: str | None = None
    k_shot: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    max_iter: int = 1000

    def _features(self, model, preprocess, data: ClassificationData, to_train: torch.Tensor | None = None):
        encoded = self.encode(model, preprocess, data.images, data.source, normalize=False)
        targets = torch.tensor(data.targets, dtype=torch.long)[encoded.kept]
        targets = to_train[targets] if to_train is not None else targets
        return encoded.features.cpu().double(), targets

    def _train_val(self, model, preprocess, train: ClassificationData):
        x, y = self._features(model, preprocess, train)
        if self.val_data is not None:
            val = read_classification(self.val_data, self.classnames)
            val_x, val_y = self._features(model, preprocess, val, _targets_in(train, val))
        else:
            train_idx, val_idx = stratified_split(y, self.val_fraction, self.seed)
            x, y, val_x, val_y = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
        if self.k_shot is not None:
            if self.k_shot < 1:
                raise ValueError(f"k_shot must be a positive number of images per class, got {self.k_shot}")
            keep = sample_k_shot(y, self.k_shot, self.seed)
            x, y = x[keep], y[keep]
        return x, y, val_x, val_y

    def run(self, model, preprocess: Callable) -> dict[str, float]:
        train = read_classification(self.train_data, self.classnames)
        test = read_classification(self.data, self.classnames)
        to_train = _targets_in(train, test)
        x, y, val_x, val_y = self._train_val(model, preprocess, train)
        num_classes = len(train.class_keys)
        l2, tried = select_l2(x, y, val_x, val_y, num_classes, max_iter=self.max_iter)
        self.details.update(l2=l2, l2_sweep=tried, num_train=len(y), num_val=len(val_y), num_classes=num_classes,
                            k_shot=self.k_shot)
        if self.k_shot is None:  # refit on train + val; a k-shot probe keeps to its K images per class
            x, y = torch.cat([x, val_x]), torch.cat([y, val_y])
        probe = fit_logistic_regression(x, y, num_classes, l2, self.max_iter)
        test_x, test_y = self._features(model, preprocess, test, to_train)
        self.details["num_test"] = len(test_y)
        return classification_metrics(probe.logits(test_x), test_y)
