"""Training checkpoints: ``OUTPUT/checkpoints/step_{step:08d}/`` with the model (clipforge's folder
format, so ``clipforge.load`` reads it) and ``train_state.pt`` (optimiser, scheduler, scaler, RNG states,
data position), written to a temporary folder and renamed into place, keeping the newest K.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from clipforge.checkpoints import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_checkpoint, step_folders
from clipforge.checkpoints import save as save_model
from clipforge.models import CLIP

STATE_NAME = "train_state.pt"


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME))


def latest_checkpoint(output: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (model, config and train state), or None."""
    for _, folder in reversed(step_folders(output)):
        if is_complete(folder):
            return folder
    return None


def save_checkpoint(output: str | Path, step: int, model: CLIP, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step_{step:08d}`` atomically and delete all but the newest ``keep`` ones.

    The folder is assembled under a hidden temporary name and renamed into place, so a process killed
    mid-save leaves either the previous checkpoints or a complete new one.
    """
    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # left behind by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    final, temp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    save_model(model, temp)
    with open(temp / STATE_NAME, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again (a run resumed at its last step)
        old = root / f".tmp_old_{step:08d}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(temp, final)
    for _, folder in step_folders(output)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    return final


def load_checkpoint(folder: str | Path, model: CLIP) -> dict:
    """Load the checkpoint's weights into ``model`` and return its train state (tensors on the CPU)."""
    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(f"{folder} is not a complete training checkpoint: it needs {WEIGHTS_NAME}, "
                                f"{CONFIG_NAME} and {STATE_NAME}")
    load_weights(model, read_checkpoint(folder).state_dict, str(folder))
    return torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)


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
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
