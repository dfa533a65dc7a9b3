"""Data-parallel plumbing: where this process sits, joining the launcher's process group, and an all-gather
that lets gradients flow back to each rank's features.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; SLURM's
``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list, from which the
rendezvous address is taken. NCCL on GPUs, gloo on CPUs. The contrastive losses (``clipforge.loss``)
build the global batch of CLIP's objective (Radford et al. 2021) from the per-rank batches with
``all_gather_with_grad``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipforge.runtime.device import resolve_device

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in data-parallel work: global rank, local rank on its node, world size, its
    device, and whether ``torch.distributed`` has a default process group (which a one-process group also
    gives). The one rank type of clipforge: training, the losses and distributed index builds all use it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # a default process group exists (collectives may be called), even of one process

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_env() -> DistEnv:
    """This process's place as ``torch.distributed`` sees it now: rank and world size of the default process
    group, ``LOCAL_RANK`` from the launcher, and ``initialized``. Without a process group this is
    ``DistEnv()``: rank 0 of 1, not initialised. The device is left at its default (the CPU): the process
    group does not know it; ``init_distributed`` gives the device it chose."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size(),
                       initialized=True)
    return DistEnv()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node's address")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env(environ: os._Environ | dict | None = None) -> dict[str, str]:
    """Rank variables for ``torch.distributed``'s ``env://`` rendezvous, from torchrun or SLURM.

    torchrun's variables win when both are present (``srun torchrun ...``). Returns ``{}`` for a
    single process. SLURM: ``MASTER_ADDR`` defaults to the first host of ``SLURM_JOB_NODELIST`` (or
    ``SLURM_NODELIST``), ``MASTER_PORT`` to 29500 + the job id modulo 1000.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {key: env[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                if key in env}
    if int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and not nodelist:
        raise ValueError("SLURM job with several tasks but no SLURM_JOB_NODELIST; set MASTER_ADDR")
    return {
        "RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT")
        or str(DEFAULT_MASTER_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000),
    }


def _device(local_rank: int, device: str) -> torch.device:
    dev = resolve_device(device)  # the one device check, shared with clipforge.load
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group described by the launcher's environment (if any) and pick the device.

    ``device``: "auto" (a GPU per local rank when CUDA is available, else the CPU), "cuda" or "cpu".
    """
    env = launcher_env()
    local_rank = int(env.get("LOCAL_RANK", "0"))
    dev = _device(local_rank, device)
    if not env or int(env["WORLD_SIZE"]) == 1:
        return DistEnv(device=dev)
    os.environ.update(env)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), dev, initialized=True)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum of ``values`` over ranks (the values themselves with one process)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums the gradients of all ranks.

    Each rank's loss depends on every rank's features, so the gradient for this rank's slice is the
    sum over ranks of the gradient each rank's loss sends to that slice: all-reduce (sum), then keep
    this rank's rows. ``torch.distributed.all_gather`` alone has no backward and drops those terms.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        env = process_env()
        rank, world_size = env.rank, env.world_size
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
    if process_env().world_size == 1:
        return tensor
    _check_same_shape(tensor, process_env().world_size)
    return _AllGatherWithGrad.apply(tensor)
