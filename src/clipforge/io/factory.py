"""The public entry points: build a CLIP by name or config, load any supported checkpoint, save ours.

Mirrors OpenAI's ``clip.available_models`` / ``clip.load`` and OpenCLIP's ``create_model_and_transforms``,
with config overrides (``image_size=336``, ``context_length=...``) instead of flags.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from clipforge.io.checkpoints import Checkpoint, model_from_checkpoint, read_checkpoint, save
from clipforge.models import CLIP, CLIPConfig, get_model_config
from clipforge.io.pretrained import PRETRAINED, PretrainedWeights, download, download_weights, pretrained_tags, pretrained_weights
from clipforge.io.runs import checkpoint_path
from clipforge.runtime.device import resolve_device
from clipforge.transforms import PreprocessConfig, image_transform

__all__ = ["available_models", "create_model", "create_model_and_transforms", "load", "save"]

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_JIT_UNSUPPORTED = (
    "jit=True is not supported: OpenAI's TorchScript module would have to be run as the archive's own code, "
    "and clipforge reads TorchScript archives as data, never executing them, so that a downloaded file cannot "
    "run code. jit=False (the default) gives the same weights and outputs; use torch.compile(model) for speed")


def available_models() -> list[str]:
    """Names of the models with downloadable weights: OpenAI's nine, as ``clip.available_models()``."""
    return list(PRETRAINED)


def create_model(name_or_config: str | Path | dict | CLIPConfig, pretrained: str | Path | None = None,
                 device: str | torch.device | None = None, precision: str = "fp32", **overrides: Any) -> CLIP:
    """Build a CLIP from a registered name, a JSON path, a config dict or a ``CLIPConfig``.

    ``pretrained``: None (random init), "openai" (OpenAI's weights for this name), an OpenCLIP tag
    (``"laion2b_s34b_b79k"``; see ``list_pretrained()``), both downloaded and checked, or a path to any
    checkpoint ``load`` reads. Names mean what OpenCLIP's do: ``ViT-B-32`` is GELU, ``ViT-B-32-quickgelu``
    QuickGELU; weights trained with the other activation than the name's give a warning, as in OpenCLIP.
    ``overrides`` change the config (``image_size=336`` interpolates the checkpoint's positional
    embeddings). ``precision``: "fp32", "fp16" or "bf16".
    """
    model, _ = _create(name_or_config, pretrained, overrides)
    return _place(model, device, precision)


def create_model_and_transforms(name_or_config: str | Path | dict | CLIPConfig,
                                pretrained: str | Path | None = None, device: str | torch.device | None = None,
                                precision: str = "fp32", **overrides: Any) -> tuple[CLIP, Callable, Callable]:
    """``create_model`` plus (train transform, eval transform) for its image size and preprocessing."""
    model, preprocess = _create(name_or_config, pretrained, overrides)
    model = _place(model, device, precision)
    return model, _transform(preprocess, model, is_train=True), _transform(preprocess, model, is_train=False)


def load(name_or_path: str | Path, device: str | torch.device | None = None, jit: bool = False,
         download_root: str | Path | None = None, precision: str | None = None) -> tuple[CLIP, Callable]:
    """Load a model in eval mode and its preprocessing, like OpenAI's ``clip.load(name, device, jit, download_root)``.

    ``name_or_path``: a name from ``available_models()`` (downloaded into ``download_root``, default
    ``$CLIPFORGE_CACHE`` or ``~/.cache/clipforge``), or a path: a clipforge or Hugging Face folder, an
    OpenAI/OpenCLIP file, or a training run directory (its newest complete checkpoint; ``RUN@best``: its best
    one, kept by ``--keep-best``). ``device``
    defaults to CUDA when available; ``precision`` to fp16 on CUDA and fp32 elsewhere, as OpenAI's.
    Returns ``(model, preprocess)`` where ``preprocess`` maps a PIL image to a (3, H, W) tensor.
    The model is always the built one: ``jit=True`` raises ValueError (see ``_JIT_UNSUPPORTED``).
    """
    if jit:
        raise ValueError(_JIT_UNSUPPORTED)
    device = resolve_device(device)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")
    path = checkpoint_path(Path(name_or_path).expanduser())
    weights = None if path.exists() else pretrained_weights(str(name_or_path))
    if weights is not None:
        checkpoint = read_checkpoint(download(str(name_or_path), download_root))
        model = model_from_checkpoint(checkpoint, get_model_config(weights.architecture), take=True)
    elif path.exists():
        checkpoint = read_checkpoint(path)
        model = model_from_checkpoint(checkpoint, take=True)
    else:
        raise FileNotFoundError(f"{str(name_or_path)!r} is neither an existing file or folder nor a model with "
                                f"pretrained weights ({', '.join(available_models())})")
    model = _place(model, device, precision).eval()
    return model, _transform(checkpoint.preprocess, model, is_train=False)


def _create(name_or_config: Any, pretrained: str | Path | None,
            overrides: dict[str, Any]) -> tuple[CLIP, PreprocessConfig | None]:
    config = _resolve_config(name_or_config)
    config = config.replace(**overrides) if overrides else config
    if pretrained is None:
        return CLIP(config), None
    checkpoint = _pretrained_checkpoint(name_or_config, pretrained, config)
    return model_from_checkpoint(checkpoint, config), checkpoint.preprocess


def _resolve_config(name_or_config: Any) -> CLIPConfig:
    if isinstance(name_or_config, CLIPConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        return CLIPConfig.from_dict(name_or_config)
    if isinstance(name_or_config, (str, Path)):
        return get_model_config(name_or_config)
    raise TypeError(f"expected a model name, JSON path, dict or CLIPConfig, got {type(name_or_config).__name__}")


def _pretrained_checkpoint(name_or_config: Any, pretrained: str | Path, config: CLIPConfig) -> Checkpoint:
    if Path(pretrained).exists() or isinstance(pretrained, Path) or _looks_like_path(str(pretrained)):
        return read_checkpoint(pretrained)
    tag = str(pretrained)
    weights = pretrained_weights(name_or_config, tag) if isinstance(name_or_config, str) else None
    if weights is None:
        if tag == "openai":
            raise ValueError(f"pretrained='openai' needs a model name with published weights "
                             f"({', '.join(available_models())}), got {name_or_config!r}")
        tags = pretrained_tags(name_or_config) if isinstance(name_or_config, str) else []
        raise FileNotFoundError(f"pretrained={tag!r} is neither an existing checkpoint path nor a pretrained tag of "
                                f"{name_or_config!r} (its tags: {', '.join(tags) or 'none'}; all pairs: "
                                f"clipforge.list_pretrained())")
    _warn_activation_mismatch(config, weights, f"{name_or_config!r} with pretrained={tag!r}")
    checkpoint = read_checkpoint(download_weights(weights))
    if weights.preprocess is not None:
        size = config.vision_cfg.image_size
        checkpoint.preprocess = PreprocessConfig.from_dict({**weights.preprocess, "image_size": size})
    return checkpoint


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or Path(text).suffix in (".pt", ".pth", ".bin", ".safetensors")


def _warn_activation_mismatch(config: CLIPConfig, weights: PretrainedWeights, what: str) -> None:
    trained = get_model_config(weights.architecture).quick_gelu
    if trained != config.quick_gelu:
        act = {True: "QuickGELU", False: "GELU"}
        warnings.warn(f"{what}: these weights were trained with {act[trained]} but the config uses "
                      f"{act[config.quick_gelu]}, so features will be off; use the architecture "
                      f"{weights.architecture!r} (or quick_gelu={trained})", UserWarning, stacklevel=4)


def _place(model: CLIP, device: str | torch.device | None, precision: str) -> CLIP:
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(_PRECISIONS)}")
    return model.to(device=device, dtype=_PRECISIONS[precision])


def _transform(preprocess: PreprocessConfig | None, model: CLIP, is_train: bool) -> Callable:
    cfg = dataclasses.replace(preprocess or PreprocessConfig(), image_size=model.image_size)  # the model's size wins
    return image_transform(cfg.image_size, is_train=is_train, mean=cfg.mean, std=cfg.std,
                           interpolation=cfg.interpolation, resize_mode=cfg.resize_mode)
