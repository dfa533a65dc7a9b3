"""State dicts in and out of weights files, safely: ``.safetensors``, ``torch.save`` files (tensors only, never
arbitrary pickled objects) and TorchScript archives (read as data by ``openai.py``); and the record every
checkpoint reader returns. The format modules (``folder``, ``open_clip``, ``hf``) build on these.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipforge.io.openai import TorchScriptError, read_torchscript
from clipforge.io.runs import CONFIG_NAME, WEIGHTS_NAME, write_files
from clipforge.models.config import CLIPConfig
from clipforge.transforms import PreprocessConfig

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # scalars in OpenAI's archives
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


@dataclass
class Checkpoint:
    """Weights in OpenAI's key layout, with the config and preprocessing they came with (if any)."""

    state_dict: dict[str, torch.Tensor]
    config: CLIPConfig | None  # None: a foreign file without a config; see checkpoints.infer_config
    preprocess: PreprocessConfig | None
    path: Path
    format: str  # "clipforge", "hf", "open_clip", "torchscript", "safetensors" or "torch"


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A weights file -> (its state dict, file kind); never unpickles arbitrary objects.

    The tensors are unwrapped from ``{"state_dict": ...}`` and ``module.`` prefixes and keep the file's key
    layout (a Hugging Face file stays in HF's: ``hf.to_openai_layout`` converts it).
    """
    kind = _sniff(path)
    if kind == "torch":
        obj = torch_load(path)
    else:
        try:
            # OpenAI's TorchScript release format: its tensors, read as data without running its code
            obj = load_file(str(path)) if kind == "safetensors" else read_torchscript(path)
        except TorchScriptError as e:
            raise CheckpointError(f"{path}: {e}") from e
        except MemoryError:
            raise
        except Exception as e:  # every reader has its own error types for damaged files
            raise _damaged(path, kind, e) from e
    tensors = _unwrap(obj, path)
    return {k: v for k, v in tensors.items() if k not in _OPENAI_EXTRA_KEYS}, kind


def torch_load(path: str | Path, what: str = "torch") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers, never arbitrary
    objects. A refused pickle raises CheckpointError naming the refused global, a damaged file one saying so."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if found is None:  # e.g. "Unsupported operand": not a pickle at all
            detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))
            raise CheckpointError(f"{path}: cannot read this {what} file; it is truncated or corrupt (not a valid "
                                  f"pickle{': ' + detail.group(1) if detail else ''}). Download or save it again") from None
        raise CheckpointError(
            f"{path}: refusing to load it: it holds a pickled Python object ({found.group(1)}) besides tensors, "
            f"and unpickling one can run arbitrary code. Re-save just its tensors with torch.save or "
            f"safetensors") from None
    except MemoryError:
        raise
    except Exception as e:  # torch's zip reader, a legacy pickle or the storage reader: a damaged file
        raise _damaged(path, what, e) from e


def _damaged(path: Path, kind: str, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read this {kind} file; it is truncated or corrupt "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                           "Download or save it again")


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    if head.startswith(b"PK\x03\x04"):  # a zip: torch.save's format, or a TorchScript archive
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as e:  # a damaged directory
            raise CheckpointError(f"{path}: the zip archive is truncated or corrupt ({e}); download or "
                                  f"save it again") from e
        return "torchscript" if any(n.endswith("/constants.pkl") for n in names) else "torch"
    header_len = int.from_bytes(head[:8], "little")
    if path.suffix == ".safetensors" or (head[8:9] == b"{" and header_len < path.stat().st_size):
        return "safetensors"
    return "torch"  # legacy (pre-zip) torch.save files


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):  # OpenCLIP's {"epoch", "name", "state_dict", "optimizer"}
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = [str(k) for k in obj][:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: holds no state dict of tensors (found {found}); expected a CLIP "
                              f"state dict, optionally wrapped as {{'state_dict': ...}}")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def read_json(path: Path) -> dict[str, Any]:
    """A config file's JSON object; CheckpointError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def weights_file(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of ``names`` that ``folder`` holds; CheckpointError if none."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"folder {folder} has a config but no weights file (one of {', '.join(names)})")


def cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict's tensors detached, on the CPU and contiguous, as safetensors writes them."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def write_model_folder(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       extra: dict[str, Any] | None = None) -> Path:
    """``model.safetensors``, then the ``extra`` files (name -> writer), then ``config.json`` (``meta``), which
    marks the folder complete; each written to a temporary and renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    write_files(folder, {
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        **(extra or {}),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2)),
    })
    return folder
