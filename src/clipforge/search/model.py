"""The model an index is built with: loading it by name or path, and the identity stored in config.json."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable

import torch

from ..encode import model_device
from clipforge.io.factory import create_model_and_transforms, load
from ..models import list_models
from ..models.layers import pack_linear_weights
from clipforge.io.pretrained import pretrained_weights


def load_model(spec: str, device: str | torch.device | None = None) -> tuple[torch.nn.Module, Callable]:
    """(model in eval mode, OpenAI-exact preprocessing) for a model name with weights, a saved model or run
    directory, or a registered architecture without weights (``tiny-vit``: seed-0 random weights, for
    tests and demos). Always float32, so that vectors do not depend on the device that encoded them."""
    if Path(spec).expanduser().exists() or pretrained_weights(spec) is not None:
        return load(spec, device=device, precision="fp32")
    if spec in list_models():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = create_model_and_transforms(spec)
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval(), preprocess
    raise FileNotFoundError(f"model {spec!r} is neither an existing file or folder nor a model name "
                            f"({', '.join(list_models())})")


def prepare_for_queries(model: torch.nn.Module) -> None:
    """Ready a model for encoding one query at a time: on the CPU, its text transformer's weights are
    packed for products of a few rows (:func:`clipforge.models.layers.pack_linear_weights`)."""
    if model_device(model).type == "cpu" and getattr(model, "transformer", None) is not None:
        pack_linear_weights(model.transformer)


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameter and buffer names and float32 values, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())  # the buffer, not a copy
    return digest.hexdigest()


def model_name(spec: str) -> str:
    """How config.json names the model: the absolute path of an existing file or folder, else the name."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def model_identity(spec: str, model: torch.nn.Module, preprocess: Callable) -> dict:
    """What config.json records about the model: its name or absolute path, weights checksum,
    embedding size and preprocessing."""
    return {"model": model_name(spec), "weights_sha256": weights_checksum(model),
            "dim": int(model.config.embed_dim),
            "preprocess": dataclasses.asdict(preprocess.config)}
