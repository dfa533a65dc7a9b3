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

from clipforge.io.checkpoints import model_from_checkpoint, read_checkpoint
from clipforge.io.folder import save
from clipforge.io.pretrained import PRETRAINED, PretrainedWeights, download_weights
from clipforge.io.spec import ModelSpec, resolve_spec, resolve_weights, spec_and_weights
from clipforge.io.tensors import Checkpoint
from clipforge.models import CLIP, CLIPConfig, get_model_config
from clipforge.models.quantize import INT8_DEVICE_ERROR, quantize_int8
from clipforge.runtime.device import resolve_device
from clipforge.transforms import PreprocessConfig, image_transform

__all__ = ["available_models", "create_model", "create_model_and_transforms", "load", "save"]

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = (*_PRECISIONS, "int8")  # int8: clipforge.models.quantize, CPU inference only
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

    ``pretrained``: None (random init, for training), "openai" (OpenAI's weights for this name), an OpenCLIP tag
    (``"laion2b_s34b_b79k"``; see ``list_pretrained()``), both downloaded and checked, or any weights the
    model-spec rule names (``clipforge.io.spec``): a checkpoint file or folder, a run directory, ``RUN@best``,
    another name with weights. The name may carry its tag in one string: ``"ViT-H-14:laion2b_s32b_b79k"``.
    Names mean what OpenCLIP's do: ``ViT-B-32`` is GELU, ``ViT-B-32-quickgelu``
    QuickGELU; weights trained with the other activation than the name's give a warning, as in OpenCLIP.
    ``overrides`` change the config (``image_size=336`` interpolates the checkpoint's positional
    embeddings). ``precision``: "fp32", "fp16", "bf16", or "int8" (CPU inference: int8 linear layers in both
    towers, ``clipforge.models.quantize.quantize_int8``; the model is returned in eval mode).
    """
    _check_precision(device, precision)  # before any weights are read
    model, _ = _create(name_or_config, pretrained, overrides)
    return _place(model, device, precision)


def create_model_and_transforms(name_or_config: str | Path | dict | CLIPConfig,
                                pretrained: str | Path | None = None, device: str | torch.device | None = None,
                                precision: str = "fp32", **overrides: Any) -> tuple[CLIP, Callable, Callable]:
    """``create_model`` plus (train transform, eval transform) for its image size and preprocessing."""
    _check_precision(device, precision)
    model, preprocess = _create(name_or_config, pretrained, overrides)
    model = _place(model, device, precision)
    return model, _transform(preprocess, model, is_train=True), _transform(preprocess, model, is_train=False)


def load(name_or_path: str | Path | ModelSpec, device: str | torch.device | None = None, jit: bool = False,
         download_root: str | Path | None = None, precision: str | None = None, pretrained: str | Path | None = None,
         random_init: bool = False) -> tuple[CLIP, Callable]:
    """Load a model in eval mode and its preprocessing, like OpenAI's ``clip.load(name, device, jit, download_root)``.

    ``name_or_path`` follows the model-spec rule (``clipforge.io.spec``), as every command's ``--model``: a name from
    ``available_models()`` (downloaded into ``download_root``, default ``$CLIPFORGE_CACHE`` or
    ``~/.cache/clipforge``); an OpenCLIP architecture with a pretrained tag, as ``pretrained="laion2b_s32b_b79k"``
    or in one string ``"ViT-H-14:laion2b_s32b_b79k"``; or a path: a clipforge or Hugging Face folder, an
    OpenAI/OpenCLIP file, a training run directory (its newest complete checkpoint; ``RUN@best``: its best one,
    kept by ``--keep-best``). An architecture without weights (``"ViT-H-14"``, ``"tiny-vit"``) raises
    ``clipforge.io.spec.NoWeightsError`` listing its tags, unless ``random_init=True`` asks for seed-0
    random weights (tests and demos). ``device``
    defaults to CUDA when available; ``precision`` to fp16 on CUDA and fp32 elsewhere, as OpenAI's; "int8"
    (CPU only; ``device`` then defaults to the CPU) quantises both towers' linear layers
    (``clipforge.models.quantize``), features within a cosine of about 0.99 of fp32's.
    Returns ``(model, preprocess)`` where ``preprocess`` maps a PIL image to a (3, H, W) tensor.
    The model is always the built one: ``jit=True`` raises ValueError (see ``_JIT_UNSUPPORTED``).
    """
    if jit:
        raise ValueError(_JIT_UNSUPPORTED)
    device = resolve_device(int8_device(device) if precision == "int8" else device)
    precision = precision or ("fp16" if device.type == "cuda" else "fp32")
    _check_precision(device, precision)  # before any weights are read
    model, preprocess = build_from_spec(resolve_spec(name_or_path, pretrained, random_init), download_root)
    model = _place(model, device, precision).eval()
    return model, _transform(preprocess, model, is_train=False)


def build_from_spec(spec: ModelSpec, download_root: str | Path | None = None,
                    config: CLIPConfig | None = None) -> tuple[CLIP, PreprocessConfig | None]:
    """The model a resolved spec names (float32, on the CPU, train mode) and its preprocessing (None: OpenAI's).
    Downloaded weights go into the architecture they were trained with (``ViT-B-32:openai`` is QuickGELU, as
    OpenAI trained it); ``config``: build this architecture instead (``create_model``: the name's, with its
    overrides; other weights than it was trained for give a warning)."""
    if config is None:
        architecture = spec.weights.architecture if spec.weights is not None else spec.architecture
        config = None if architecture is None else get_model_config(architecture)
    if spec.random_init:
        with torch.random.fork_rng(devices=[]):  # the same seed-0 weights every time, the caller's RNG untouched
            torch.manual_seed(0)
            return CLIP(config), None
    checkpoint = read_checkpoint(spec.path) if spec.path is not None else _downloaded(spec, config, download_root)
    return model_from_checkpoint(checkpoint, config, take=True), checkpoint.preprocess


def _create(name_or_config: Any, pretrained: str | Path | None,
            overrides: dict[str, Any]) -> tuple[CLIP, PreprocessConfig | None]:
    if isinstance(name_or_config, str) and not Path(name_or_config).exists():
        name_or_config, pretrained = spec_and_weights(name_or_config, pretrained)  # "ViT-H-14:laion2b_s32b_b79k"
    config = _resolve_config(name_or_config)
    config = config.replace(**overrides) if overrides else config
    if pretrained is None:
        return CLIP(config), None
    arch = str(name_or_config) if isinstance(name_or_config, (str, Path)) else None
    return build_from_spec(resolve_weights(arch, pretrained), config=config)


def _resolve_config(name_or_config: Any) -> CLIPConfig:
    if isinstance(name_or_config, CLIPConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        return CLIPConfig.from_dict(name_or_config)
    if isinstance(name_or_config, (str, Path)):
        return get_model_config(name_or_config)
    raise TypeError(f"expected a model name, JSON path, dict or CLIPConfig, got {type(name_or_config).__name__}")


def _downloaded(spec: ModelSpec, config: CLIPConfig | None, download_root: str | Path | None) -> Checkpoint:
    """The checkpoint of a spec's downloadable weights, fetched and checked (or from the cache)."""
    weights = spec.weights
    if config is not None:
        _warn_activation_mismatch(config, weights, f"{spec.architecture!r} with pretrained={spec.tag or spec.text!r}")
    checkpoint = read_checkpoint(download_weights(weights, download_root))
    if weights.preprocess is not None:
        size = config.vision_cfg.image_size
        checkpoint.preprocess = PreprocessConfig.from_dict({**weights.preprocess, "image_size": size})
    return checkpoint


def _warn_activation_mismatch(config: CLIPConfig, weights: PretrainedWeights, what: str) -> None:
    trained = get_model_config(weights.architecture).quick_gelu
    if trained != config.quick_gelu:
        act = {True: "QuickGELU", False: "GELU"}
        warnings.warn(f"{what}: these weights were trained with {act[trained]} but the config uses "
                      f"{act[config.quick_gelu]}, so features will be off; use the architecture "
                      f"{weights.architecture!r} (or quick_gelu={trained})", UserWarning, stacklevel=4)


def _place(model: CLIP, device: str | torch.device | None, precision: str) -> CLIP:
    _check_precision(device, precision)
    if precision == "int8":  # int8 weights and dynamically quantised activations, on the CPU only
        return quantize_int8(model.float().cpu().eval())
    return model.to(device=device, dtype=_PRECISIONS[precision])


def _check_precision(device: str | torch.device | None, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        int8_device(device)


def int8_device(device: str | torch.device | None) -> str | torch.device:
    """The CPU, where int8 runs (also the default): ValueError for any other device, before anything is loaded."""
    if device is None or device == "auto":
        return "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = resolve_device(device).type  # raises its ValueError for a name torch does not know
    if kind != "cpu":
        raise ValueError(f"device {str(device)!r}: {INT8_DEVICE_ERROR}")
    return device


def _transform(preprocess: PreprocessConfig | None, model: CLIP, is_train: bool) -> Callable:
    cfg = dataclasses.replace(preprocess or PreprocessConfig(), image_size=model.image_size)  # the model's size wins
    return image_transform(cfg.image_size, is_train=is_train, mean=cfg.mean, std=cfg.std,
                           interpolation=cfg.interpolation, resize_mode=cfg.resize_mode)
