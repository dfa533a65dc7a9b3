"""One optimisation step of CLIP's contrastive pre-training (Radford et al. 2021), SigLIP (Zhai et al.
2023) or an image-only objective (bag-of-words or caption prediction, classification): forward, loss,
backward (optionally accumulated exactly over micro-batches), clipping, update.

Exact accumulation follows GradCache (Gao et al. 2021), as OpenCLIP's ``--accum-freq``: the features of
all micro-batches are first computed without gradients; then each micro-batch is recomputed with
gradients and substituted into the cached features, so every backward sees the loss of the whole
accumulated batch (its negatives included) and the summed gradients equal those of one big batch.
The image-only losses are means of per-sample (or per-token) terms: each micro-batch's mean, weighted by
its share of the samples (tokens), sums to the whole batch's mean, so plain accumulation is exact.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from clipforge.loss import (
    SIGLIP_INIT_LOGIT_BIAS,
    SIGLIP_INIT_LOGIT_SCALE,
    clamp_logit_scale_,
    contrastive_loss,
    sigmoid_loss,
)
from clipforge.models import CLIP
from clipforge.objectives import image_only, prediction_loss, predictions
from clipforge.train.config import TWO_TOWER_LOSSES, objective_of

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W), tokens (B, L) or class labels (B,)


class TrainModule(nn.Module):
    """The CLIP model plus what only the loss learns (SigLIP's bias); ``forward`` gives normalised features
    (two-tower losses) or the image-only objective's logits.

    Distributed data parallelism wraps this module: its ``forward`` is the part that runs per micro-batch.
    """

    def __init__(self, clip: CLIP, loss: str = "contrastive", init_siglip_scale: bool = True):
        super().__init__()
        self.clip, self.objective = clip, objective_of(loss)
        self.logit_bias = None
        if loss == "sigmoid":
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS))
            if init_siglip_scale:
                with torch.no_grad():
                    clip.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if self.objective != "contrastive":
            return predictions(self.clip, images, targets)
        return self.clip.encode_image(images, normalize=True), self.clip.encode_text(targets, normalize=True)


@dataclass(frozen=True)
class TrainingLoss:
    """The training loss of features: which loss, and how the global batch is formed across ranks."""

    kind: str = "contrastive"
    gather: bool = True
    local_loss: bool = False
    tile_size: int | None = None

    def __call__(self, module: TrainModule, images: torch.Tensor, texts: torch.Tensor,
                 temperature_grad: bool = True) -> torch.Tensor:
        """The loss of (N, D) features; ``temperature_grad=False`` detaches the scale (and bias)."""
        images, texts = images.float(), texts.float()
        scale = module.clip.logit_scale.exp()
        scale = scale if temperature_grad else scale.detach()
        if self.kind == "sigmoid":
            bias = module.logit_bias if temperature_grad else module.logit_bias.detach()
            return sigmoid_loss(images, texts, scale, bias, gather=self.gather)
        return contrastive_loss(images, texts, scale, self.tile_size, gather=self.gather,
                                local_loss=self.local_loss)

    @property
    def pairwise(self) -> bool:
        """Whether the loss pairs image and text features of the whole batch (so needs cached accumulation)."""
        return self.kind in TWO_TOWER_LOSSES

    def shares(self, micro_batches: list[Batch]) -> list[float]:
        """Each micro-batch's share of the batch's mean loss: the share of the terms the mean is over
        (predicted tokens for caption, captions with a word for bow, samples for classify)."""
        counts = [image_only(self.kind).terms(targets) for _, targets in micro_batches]
        total = sum(counts) or 1.0  # no term at all: every micro-batch's loss is 0
        return [count / total for count in counts]


def accumulated_backward(forward: Callable[[torch.Tensor, torch.Tensor], Batch], micro_batches: list[Batch],
                         loss_fn: Callable[..., torch.Tensor], backward: Callable[[torch.Tensor], None],
                         autocast: Callable[[], ContextManager] = nullcontext,
                         no_sync: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
    """Backward of the loss of the concatenated micro-batches, one micro-batch's activations at a time.

    ``loss_fn(images, texts, temperature_grad)`` gets the features of the whole batch; the temperature
    (a direct input of the loss, not of the features) takes its gradient in the last pass only, so it
    is counted once. ``no_sync`` (DDP's) wraps every pass but the last. Returns the loss (detached).
    """
    with torch.no_grad(), autocast():
        cached = [forward(images, tokens) for images, tokens in micro_batches]
    cached_images = [c[0] for c in cached]
    cached_texts = [c[1] for c in cached]
    for j, (images, tokens) in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        with nullcontext() if last else no_sync():
            with autocast():
                image_features, text_features = forward(images, tokens)
            all_images = torch.cat(cached_images[:j] + [image_features] + cached_images[j + 1:])  # (K*B, D)
            all_texts = torch.cat(cached_texts[:j] + [text_features] + cached_texts[j + 1:])  # (K*B, D)
            loss = loss_fn(all_images, all_texts, temperature_grad=last)
            backward(loss)
    return loss.detach()


class Stepper:
    """Runs optimiser steps: forward/backward (plain or accumulated), unscale, clip, update, clamp.

    ``wrapped`` is the module that computes features (the TrainModule, maybe inside DDP and/or
    ``torch.compile``); ``module`` is the bare TrainModule.
    """

    def __init__(self, module: TrainModule, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: TrainingLoss, scaler: torch.amp.GradScaler, autocast: Callable[[], ContextManager],
                 grad_clip_norm: float | None = None):
        self.module, self.wrapped, self.optimizer, self.loss_fn = module, wrapped, optimizer, loss_fn
        self.scaler, self.autocast, self.grad_clip_norm = scaler, autocast, grad_clip_norm
        self.params = [p for p in module.parameters() if p.requires_grad]

    def _loss(self, images: torch.Tensor, texts: torch.Tensor, temperature_grad: bool = True) -> torch.Tensor:
        return self.loss_fn(self.module, images, texts, temperature_grad)

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _no_sync(self) -> ContextManager:
        no_sync = getattr(self.wrapped, "no_sync", None)
        return no_sync() if no_sync is not None else nullcontext()

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Gradients of the loss of the whole (accumulated) batch, in ``.grad``; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self.loss_fn.pairwise:
            return self._prediction_backward(micro_batches)
        if len(micro_batches) > 1:
            return accumulated_backward(self.wrapped, micro_batches, self._loss, self._backward, self.autocast,
                                        self._no_sync)
        images, tokens = micro_batches[0]
        with self.autocast():
            image_features, text_features = self.wrapped(images, tokens)
        loss = self._loss(image_features, text_features)
        self._backward(loss)
        return loss.detach()

    def _prediction_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """An image-only loss: one backward per micro-batch of its mean loss times its share of the batch."""
        total = torch.zeros(())
        for j, ((images, targets), share) in enumerate(zip(micro_batches, self.loss_fn.shares(micro_batches))):
            with nullcontext() if j == len(micro_batches) - 1 else self._no_sync():
                with self.autocast():
                    logits = self.wrapped(images, targets)
                loss = prediction_loss(self.loss_fn.kind, logits, targets) * share
                self._backward(loss)
            total = total.to(loss.device) + loss.detach()
        return total

    def step(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the loss and the gradient norm before clipping (as tensors)."""
        loss = self.forward_backward(micro_batches)
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip_norm, grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.module.clip.logit_scale.requires_grad:  # a fixed temperature stays exactly as set
            clamp_logit_scale_(self.module.clip.logit_scale)
        return {"loss": loss, "grad_norm": grad_norm}
