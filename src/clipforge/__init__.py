"""clipforge: CLIP (Radford et al. 2021) in PyTorch.

The public API is imported lazily, so ``import clipforge`` stays cheap and each name pulls in only
the module that defines it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # models and checkpoints
    "CLIP": "clipforge.models", "CLIPConfig": "clipforge.models", "list_models": "clipforge.models",
    "get_model_config": "clipforge.models",
    "available_models": "clipforge.io.factory", "create_model": "clipforge.io.factory",
    "create_model_and_transforms": "clipforge.io.factory", "load": "clipforge.io.factory", "save": "clipforge.io.factory",
    "list_pretrained": "clipforge.io.pretrained",
    "NoWeightsError": "clipforge.io.spec",  # an architecture named without weights (nor random_init=True)
    "export_hf": "clipforge.io.hf",
    # text and images
    "tokenize": "clipforge.tokenizer", "get_tokenizer": "clipforge.tokenizer", "Tokenizer": "clipforge.tokenizer",
    "model_tokenizer": "clipforge.tokenizer",
    "image_transform": "clipforge.transforms",
    "PreprocessConfig": "clipforge.transforms",
    "OPENAI_DATASET_MEAN": "clipforge.transforms", "OPENAI_DATASET_STD": "clipforge.transforms",
    # losses and zero-shot
    "contrastive_loss": "clipforge.loss", "sigmoid_loss": "clipforge.loss",
    "build_zeroshot_classifier": "clipforge.zeroshot", "ZeroShotClassifier": "clipforge.zeroshot",
    "export_onnx": "clipforge.io.onnx", "OnnxEncoder": "clipforge.io.onnx",
    # process set-up
    "retain_freed_memory": "clipforge.runtime.allocator",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
