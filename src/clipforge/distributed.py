"""Rank and world size, and an all-gather that lets gradients flow back to each rank's features.

Used by the contrastive losses (``clipforge.loss``) to build the global batch of CLIP's objective
(Radford et al. 2021) from the per-rank batches of data-parallel training.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class WorldInfo(NamedTuple):
    """Where this process sits in data-parallel training; ``initialized`` tells whether a default process
    group exists (``torch.distributed`` collectives may be called), which a one-process group also gives."""

    rank: int
    world_size: int
    initialized: bool


def world_info() -> WorldInfo:
    """This process's rank, the world size and whether ``torch.distributed`` is initialised.

    Without an initialised default process group this is ``WorldInfo(0, 1, False)``.
    """
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), True)
    return WorldInfo(0, 1, False)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums the gradients of all ranks.

    Each rank's loss depends on every rank's features, so the gradient for this rank's slice is the
    sum over ranks of the gradient each rank's loss sends to that slice: all-reduce (sum), then keep
    this rank's rows. ``torch.distributed.all_gather`` alone has no backward and drops those terms.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size, _ = world_info()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)  # (world_size * rows, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def _check_same_shape(tensor: torch.Tensor, world_size: int) -> None:
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    found = sorted({tuple(s.tolist()) for s in shapes})
    if len(found) > 1:
        raise ValueError(
            f"all_gather_with_grad: every rank must pass a tensor of the same shape, got {found}; "
            "use equal per-rank batch sizes (e.g. drop the last incomplete batch)")


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 (rank order), differentiable.

    ``tensor`` must have the same shape on every rank. Without an initialised process group, or with
    one process, the tensor is returned unchanged.

    Gradient scaling: the backward hands rank ``r`` the *sum* over ranks of the gradients reaching
    slice ``r``. When every rank's loss ``L_r`` satisfies ``mean_r L_r = L`` (the loss on the
    concatenated batch), rank ``r``'s features receive ``sum_k dL_k/df_r = world_size * dL/df_r``,
    which is exactly the factor DDP's averaging of parameter gradients over ranks divides out: the
    averaged gradients equal those of one process on the whole batch. Both modes of
    ``clipforge.loss.contrastive_loss`` meet the premise: with the full loss every rank computes
    ``L`` itself; with the local loss rank ``r`` computes the mean over its own rows and columns,
    and the mean of those over ranks is ``L``.
    """
    rank, world_size, _ = world_info()
    if world_size == 1:
        return tensor
    _check_same_shape(tensor, world_size)
    return _AllGatherWithGrad.apply(tensor)
