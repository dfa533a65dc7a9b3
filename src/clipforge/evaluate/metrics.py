"""Evaluation metrics as fractions in [0, 1]: top-k accuracy, mean per-class recall, retrieval recall@K.

Retrieval follows the COCO/Flickr30k protocol of the CLIP paper (Table 13): an image counts as retrieved
at K when any of its captions is among the K most similar texts.
"""
from __future__ import annotations

from typing import Sequence

import torch


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``top{k}`` for each k: the fraction of rows whose target is among the k highest logits.

    k is capped at the number of classes, so ``top5`` over 3 classes is 1.0.
    """
    if logits.shape[0] == 0:
        raise ValueError("no predictions to score (0 samples)")
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=-1).indices  # (N, kmax)
    hits = ranked == targets.to(ranked.device)[:, None]  # (N, kmax)
    return {f"top{k}": hits[:, :k].any(dim=-1).float().mean().item() for k in ks}


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Average over the classes present in ``targets`` of the fraction of their samples predicted right."""
    targets = targets.to(predictions.device)
    counts = torch.bincount(targets, minlength=num_classes).float()
    correct = torch.bincount(targets[predictions == targets], minlength=num_classes).float()
    present = counts > 0
    return (correct[present] / counts[present]).mean().item()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``top1``, ``top5`` and ``mean_per_class_recall`` of logits (N, C) against integer targets (N,)."""
    metrics = topk_accuracy(logits, targets, (1, 5))
    metrics["mean_per_class_recall"] = mean_per_class_recall(logits.argmax(dim=-1), targets, logits.shape[1])
    return metrics


def retrieval_metrics(similarity: torch.Tensor, image_of_text: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``image_to_text_recall@K`` and ``text_to_image_recall@K`` from similarities (N_images, N_texts).

    ``image_of_text[j]`` is the index of the image that caption ``j`` describes. K is capped at the number
    of candidates.
    """
    n_images, n_texts = similarity.shape
    image_of_text = image_of_text.to(similarity.device)
    positives = image_of_text[None, :] == torch.arange(n_images, device=similarity.device)[:, None]  # (N_img, N_txt)
    if not positives.any(dim=1).all():
        raise ValueError("every image needs at least one caption for image-to-text recall")
    metrics = {}
    texts_by_rank = similarity.topk(min(max(ks), n_texts), dim=1).indices  # (N_img, kmax)
    caption_hits = positives.gather(1, texts_by_rank)  # (N_img, kmax): is the r-th text one of its captions
    for k in ks:
        metrics[f"image_to_text_recall@{k}"] = caption_hits[:, :k].any(dim=1).float().mean().item()
    images_by_rank = similarity.t().topk(min(max(ks), n_images), dim=1).indices  # (N_txt, kmax)
    image_hits = images_by_rank == image_of_text[:, None]  # (N_txt, kmax)
    for k in ks:
        metrics[f"text_to_image_recall@{k}"] = image_hits[:, :k].any(dim=1).float().mean().item()
    return metrics
