"""Training checkpoints: ``OUTPUT/checkpoints/step_{step:08d}/`` with the model (clipforge's folder
format, so ``clipforge.load`` reads it) and ``train_state.pt`` (optimiser, scheduler, scaler, RNG states,
data position), written atomically (``clipforge.io.runs`` owns the layout), keeping the newest K.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clipforge.io.checkpoints import load_weights, read_checkpoint
from clipforge.io.folder import save as save_model
from clipforge.io.runs import (
    BEST_RECORD,
    CONFIG_NAME,
    STATE_NAME,
    TRAIN_FILES,
    WEIGHTS_NAME,
    best_folder,
    is_complete,
    step_folder,
    step_folders,
    write_files,
    write_folder,
)
from clipforge.io.tensors import CheckpointError, torch_load
from clipforge.models import CLIP

_STATE_KEYS = {"step", "optimizer", "schedule", "scaler", "rng", "skipped", "run"}  # what the trainer saves


def save_checkpoint(output: str | Path, step: int, model: CLIP, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step_{step:08d}`` atomically and delete all but the newest ``keep`` ones.

    The folder is assembled under a hidden temporary name and renamed into place, so a process killed
    mid-save leaves either the previous checkpoints or a complete new one.
    """
    def fill(folder: Path) -> None:
        save_model(model, folder)
        write_files(folder, {STATE_NAME: lambda path: torch.save(state, path)})

    final = write_folder(step_folder(output, step), fill)
    for _, folder in step_folders(output)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def load_checkpoint(folder: str | Path, model: CLIP, check: Callable[[dict], None] | None = None) -> dict:
    """Load the checkpoint's weights into ``model`` and return its train state (tensors on the CPU).

    ``check(state)`` runs before the weights are loaded (e.g. to refuse changed run settings, which may
    also change the architecture). A damaged or refused file (truncated, corrupt, a pickle holding
    objects) raises CheckpointError naming it.
    """
    folder = Path(folder)
    if not is_complete(folder, TRAIN_FILES):
        raise FileNotFoundError(f"{folder} is not a complete training checkpoint: it needs {WEIGHTS_NAME}, "
                                f"{CONFIG_NAME} and {STATE_NAME}")
    state = torch_load(folder / STATE_NAME, "training state")
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        raise CheckpointError(f"{folder / STATE_NAME}: not a clipforge training state (it needs the keys "
                              f"{sorted(_STATE_KEYS)}); the file is damaged or from another program")
    if check is not None:
        check(state)
    load_weights(model, read_checkpoint(folder).state_dict, str(folder))
    return state


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors, lists and numbers (``weights_only``-safe)."""
    version, mt_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_mode(metric: str) -> tuple[str, str]:
    """``(metric name, "min" | "max")`` from ``--keep-best METRIC[:min|max]``; without a suffix, losses and
    ranks are lower-is-better and every other metric (accuracies, recalls) higher-is-better."""
    name, _, mode = metric.partition(":")
    name = name.strip()
    if name.startswith("val_"):  # the name as `clipforge train` prints it
        name = name[len("val_"):]
    if mode not in ("", "min", "max"):
        raise ValueError(f"--keep-best {metric}: the suffix must be ':min' or ':max', got {mode!r}")
    return name, mode or ("min" if "loss" in name or "rank" in name else "max")


def save_best(output: str | Path, step: int, model: CLIP, metric: str, mode: str, value: float) -> Path:
    """Write the model as ``checkpoints/best`` (atomically, replacing the previous best) with ``best.json``."""
    record = {"metric": metric, "mode": mode, "value": value, "step": step}

    def fill(folder: Path) -> None:
        save_model(model, folder)
        write_files(folder, {BEST_RECORD: lambda path: path.write_text(json.dumps(record) + "\n")})

    return write_folder(best_folder(output), fill)
