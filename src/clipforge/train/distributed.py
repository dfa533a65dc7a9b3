"""Process-group set-up for data-parallel training, from torchrun's or SLURM's environment.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; SLURM's
``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list, from which the
rendezvous address is taken. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipforge.factory import resolve_device

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, local rank on its node, world size, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


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
    return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), dev)


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
