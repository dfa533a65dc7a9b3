"""Which device to run on: the one check shared by loading, training, evaluation and search."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device, default (None or "auto") CUDA when available, else the CPU.

    ValueError for a device this machine lacks (CUDA on a CPU-only torch or without a GPU, ``cuda:N`` past
    the last GPU) or a name torch does not know, instead of torch's assertion deep inside ``.to``.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        built = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {device}: no CUDA GPU is available ({built}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"numbered from 0; use --device cuda:0")
    return dev
