"""The layout of a training run (``checkpoints/step_N`` folders, run files, the files of a model folder)
and the atomic writes that fill it: a file or a folder is either complete and in place or absent.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable

CHECKPOINTS_DIR = "checkpoints"
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
STATE_NAME = "train_state.pt"
RUN_CONFIG_NAME, METRICS_NAME, TENSORBOARD_DIR = "run_config.json", "metrics.jsonl", "tensorboard"
HF_TEXT_DIR = "hf_text"  # a Hugging Face text tower's model config and tokenizer, inside a model folder
MODEL_FILES = (WEIGHTS_NAME, CONFIG_NAME)  # what clipforge.load reads
TRAIN_FILES = (*MODEL_FILES, STATE_NAME)  # what a resume reads
_STEP_FOLDER = re.compile(r"step_(\d+)")
_TEMP_PREFIX = ".tmp_"


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The folder holding a run's ``step_N`` checkpoint folders."""
    return Path(run_dir) / CHECKPOINTS_DIR


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a training run directory (it has a checkpoints folder)."""
    return checkpoints_dir(path).is_dir()


def step_folder(run_dir: str | Path, step: int) -> Path:
    """Where a run's checkpoint of ``step`` lives: ``checkpoints/step_{step:08d}``."""
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def step_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` for every ``checkpoints/step_*`` folder of a run, complete or not, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = ((_STEP_FOLDER.fullmatch(p.name), p) for p in root.iterdir() if p.is_dir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


BEST_DIR, BEST_RECORD = "best", "best.json"  # checkpoints/best: the best checkpoint by --keep-best's metric
BEST_SUFFIX = "@best"


def best_folder(run_dir: str | Path) -> Path:
    """Where a run keeps its best checkpoint (``--keep-best``): ``checkpoints/best``; never pruned."""
    return checkpoints_dir(run_dir) / BEST_DIR


def read_best(run_dir: str | Path) -> dict | None:
    """``{"metric", "mode", "value", "step"}`` of a run's best checkpoint, or None if it has none."""
    record = best_folder(run_dir) / BEST_RECORD
    return json.loads(record.read_text()) if is_complete(best_folder(run_dir), (*MODEL_FILES, BEST_RECORD)) else None


def checkpoint_path(spec: str | Path) -> Path:
    """A path to load: ``RUN@best`` is the run's best checkpoint (FileNotFoundError if it has none); any
    other path is itself (a run directory then means its newest checkpoint)."""
    text = str(spec)
    if not text.endswith(BEST_SUFFIX) or Path(text).exists():
        return Path(text)
    run = Path(text[: -len(BEST_SUFFIX)]).expanduser()
    if read_best(run) is None:
        raise FileNotFoundError(f"{text}: {run} has no best checkpoint ({best_folder(run)}); train it with "
                                "--keep-best METRIC, or load the run's newest checkpoint with the bare path")
    return best_folder(run)


def is_complete(folder: str | Path, require: tuple[str, ...] = MODEL_FILES) -> bool:
    """Whether ``folder`` holds every file in ``require``."""
    return all((Path(folder) / name).is_file() for name in require)


def latest_checkpoint(run_dir: str | Path, require: tuple[str, ...] = MODEL_FILES) -> Path | None:
    """The newest ``checkpoints/step_*`` folder of a run holding every file in ``require``, or None."""
    for _, folder in reversed(step_folders(run_dir)):
        if is_complete(folder, require):
            return folder
    return None


def write_files(folder: Path, writers: dict[str, Callable[[Path], Any]]) -> None:
    """Write ``folder/name`` with ``writers[name](path)`` for each name, atomically, the last one last.

    Each file is written to a hidden temporary, fsynced and renamed into place. Of several files the last
    marks the folder complete, so an old one is removed first: it must not vouch for new files. A single
    file is simply replaced, so there is never a moment without it.
    """
    tag = uuid.uuid4().hex[:8]
    temps = {name: folder / f".{name}.{tag}.tmp" for name in writers}
    try:
        for name, write in writers.items():
            _write_temp(temps[name], write)
        if len(writers) > 1:
            (folder / list(writers)[-1]).unlink(missing_ok=True)
        for name in writers:
            os.replace(temps[name], folder / name)
        _fsync_dir(folder)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def write_folder(folder: Path, fill: Callable[[Path], Any]) -> Path:
    """Create ``folder`` atomically: ``fill`` writes into a hidden temporary sibling that is then renamed.

    An existing ``folder`` is replaced. Temporaries left in the parent by a killed writer are removed
    first, so the parent must hold only folders written this way (as a run's checkpoints folder does).
    """
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{_TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    temp, old = parent / f"{_TEMP_PREFIX}{folder.name}", parent / f"{_TEMP_PREFIX}old_{folder.name}"
    temp.mkdir()
    try:
        fill(temp)
        _fsync_dir(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if folder.exists():  # the same folder written again, e.g. a run resumed at its last step
        os.replace(folder, old)
    os.replace(temp, folder)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)
    return folder


def _write_temp(temp: Path, write: Callable[[Path], Any]) -> None:
    temp.touch(exist_ok=False)  # created as any new file is, so its mode follows the umask
    mode = stat.S_IMODE(temp.stat().st_mode)
    write(temp)
    os.chmod(temp, mode)  # a writer may replace the file with its own mode (safetensors makes it 0600)
    _fsync(temp)


def _fsync_dir(folder: Path) -> None:
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claim_output(out: Path, marker: str, program: str) -> None:
    """Mark ``out`` as a folder of ``program`` (its ``marker`` file); ValueError if ``out`` is a file or holds
    files that program did not write, so a command's ``--output`` never replaces someone else's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; the {program} writes a folder (its data, runs and report)")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        found = sorted(p.name for p in out.iterdir())
        raise ValueError(f"--output {out} is not empty and is not a previous {program} folder (it has no {marker}; "
                         f"it holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}); the {program} would "
                         "replace files there: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).write_text(f"written by clipforge {program}; it may replace the files of this folder\n")
