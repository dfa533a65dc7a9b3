"""The paper's image-only pre-training objectives (Radford et al. 2021, sec. 2.3), dispatched in one place: for
"bow", "caption" and "classify" (``models.config.OBJECTIVES`` after "contrastive"), what the model predicts
from a batch, the loss of those predictions, how many terms that mean is over, and how the model scores
zero-shot prompts. Training and validation (``train/``) and zero-shot classification (``zeroshot.py``) call
``image_only``; a "contrastive" model has two towers instead, whose features ``loss.py`` scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from clipforge.loss import bow_loss, caption_loss, predicted_token_mask, word_token_mask
from clipforge.models.text import cut_after_end_of_text

Scorer = Callable[[torch.Tensor], torch.Tensor]  # preprocessed images (B, 3, H, W) -> class scores (B, C)
# The most caption-decoder logits (images x prompt positions x vocabulary) held at once while scoring prompts.
_CAPTION_LOGITS_BUDGET = 2 ** 24


@dataclass(frozen=True)
class ImageOnlyObjective:
    """What a model without a text encoder does with images and their targets (caption tokens or class labels)."""

    predict: Callable[..., torch.Tensor]  # (model, images, targets) -> the logits the loss scores
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (float logits, targets) -> the mean loss
    terms: Callable[[torch.Tensor], float]  # targets -> how many terms that mean is over
    scorer: Callable[..., Scorer]  # (model, classnames, class-major prompts, tokenizer) -> zero-shot scores


def model_objective(model) -> str:
    """The model's training objective: "contrastive" (CLIP, and any model that does not say), "bow",
    "caption" or "classify"."""
    return getattr(model, "objective", "contrastive")


def image_only(objective: str) -> ImageOnlyObjective:
    """The predictions, loss, term count and zero-shot scorer of an image-only objective."""
    if objective not in _IMAGE_ONLY:
        raise ValueError(f"a {objective!r} model gives features, not predictions; use its two towers")
    return _IMAGE_ONLY[objective]


def predictions(model, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The logits an image-only model's loss scores: (N, V) words, (P, V) next tokens at the P predicted
    positions, or (N, C) classes."""
    return image_only(model_objective(model)).predict(model, images, targets)


def prediction_loss(objective: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean loss of an image-only objective: bag-of-words or next-token cross-entropy, or classification."""
    return image_only(objective).loss(logits.float(), targets)


def _caption_predictions(model, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # teacher-forced on its own tokens, the output layer only where the loss counts a prediction
    return model.caption_logits(images, cut_after_end_of_text(tokens), predicted_only=True)


def _bow_scorer(model, classnames: Sequence[str], prompts: list[str], tokenizer) -> Scorer:
    tokens = tokenizer(prompts)  # (C * T, L)
    counts = torch.zeros(len(tokens), model.config.text_cfg.vocab_size)
    counts.scatter_add_(1, tokens, word_token_mask(tokens).float())  # (C * T, V) word counts per prompt
    # sum of log p(w) over a prompt's words = log_probs @ counts: linear, so the mean over templates is one matrix
    counts = counts.view(len(classnames), -1, counts.shape[-1]).mean(dim=1).t().contiguous()  # (V, C)
    return lambda images: F.log_softmax(model.bow_logits(images).float(), dim=-1) @ counts.to(images.device)


def _caption_scorer(model, classnames: Sequence[str], prompts: list[str], tokenizer) -> Scorer:
    prompts = cut_after_end_of_text(tokenizer(prompts))  # (P, L)
    per_chunk = max(1, _CAPTION_LOGITS_BUDGET // (prompts.numel() * model.config.text_cfg.vocab_size))

    def score(images: torch.Tensor) -> torch.Tensor:
        memory = model.decoder.memory(model.image_tokens(images))  # (B, S, width)
        tokens = prompts.to(memory.device)
        likelihoods = torch.cat([model.decoder.prompt_log_likelihoods(chunk, tokens) for chunk in memory.split(per_chunk)])
        return likelihoods.view(len(images), len(classnames), -1).mean(dim=-1)  # (B, P) -> (B, C)
    return score


def _classify_scorer(model, classnames: Sequence[str], prompts: list[str], tokenizer) -> Scorer:
    known = model.config.classnames
    unknown = [c for c in classnames if c not in known]
    if unknown:
        raise ValueError(f"class name(s) {unknown[:10]} are not among the {len(known)} classes this classify "
                         f"model was trained on ({', '.join(known[:10])}{', ...' if len(known) > 10 else ''})")
    columns = torch.tensor([known.index(c) for c in classnames])
    return lambda images: model.class_logits(images).float()[:, columns.to(images.device)]


_IMAGE_ONLY = {
    "bow": ImageOnlyObjective(
        predict=lambda model, images, tokens: model.bow_logits(images),
        loss=bow_loss,
        terms=lambda tokens: float(word_token_mask(tokens).any(dim=-1).sum()),  # captions with a word
        scorer=_bow_scorer),
    "caption": ImageOnlyObjective(
        predict=_caption_predictions,
        # positions after the batch's last end-of-text predict nothing: cut, as the predictions are
        loss=lambda logits, tokens: caption_loss(logits, cut_after_end_of_text(tokens)),
        terms=lambda tokens: float(predicted_token_mask(tokens).sum()),  # predicted tokens
        scorer=_caption_scorer),
    "classify": ImageOnlyObjective(
        predict=lambda model, images, labels: model.class_logits(images),
        loss=F.cross_entropy,
        terms=lambda labels: float(len(labels)),  # samples
        scorer=_classify_scorer),
}
