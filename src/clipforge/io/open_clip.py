"""OpenCLIP's folder format: ``open_clip_config.json`` (``model_cfg`` in OpenCLIP's schema, ``preprocess_cfg``)
beside ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, as OpenCLIP's hub folders hold.

Read here, and written beside every clipforge save that OpenCLIP can build, so that
``open_clip.create_model_and_transforms("local-dir:FOLDER")`` loads it (finding our ``model.safetensors``).
OpenCLIP's weights use OpenAI's key layout, so they load without remapping.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.io.tensors import Checkpoint, read_json, read_tensors, weights_file
from clipforge.models.config import CLIPConfig
from clipforge.transforms import PreprocessConfig

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def is_open_clip_folder(path: Path) -> bool:
    """Whether ``path`` holds OpenCLIP's config and one of its weights files."""
    return (path / OPEN_CLIP_CONFIG).is_file() and any((path / name).is_file() for name in OPEN_CLIP_WEIGHTS)


def read_open_clip_folder(path: Path) -> Checkpoint:
    """An OpenCLIP hub folder's weights, with the architecture and preprocessing its config gives."""
    source = str(path / OPEN_CLIP_CONFIG)
    meta = read_json(path / OPEN_CLIP_CONFIG)
    tensors, _ = read_tensors(weights_file(path, OPEN_CLIP_WEIGHTS))
    return Checkpoint(tensors, CLIPConfig.from_dict(meta, source=source), read_preprocess(meta, source),
                      path, "open_clip")


def read_preprocess(meta: dict[str, Any], source: str) -> PreprocessConfig | None:
    """The ``preprocess_cfg`` of a config in OpenCLIP's schema (ours follows it), or None if it has none."""
    cfg = meta.get("preprocess_cfg")
    return None if cfg is None else PreprocessConfig.from_dict(cfg, source=f"{source}: preprocess_cfg")


def open_clip_can_build(config: CLIPConfig) -> bool:
    """OpenCLIP has no bag-of-words text tower, no MLP projection and no text-encoder-free objectives."""
    return config.text_cfg.encoder == "transformer" and config.objective == "contrastive" \
        and config.projection == "linear"


def open_clip_config(config: CLIPConfig, preprocess: PreprocessConfig) -> dict[str, Any]:
    """``open_clip_config.json`` contents in OpenCLIP's schema: ``model_cfg`` without clipforge-only keys
    (``text_cfg.encoder``) and ``preprocess_cfg`` with OpenCLIP's names (``size``, ``mode``, ``fill_color``)."""
    model_cfg = config.to_dict()
    del model_cfg["text_cfg"]["encoder"]
    model_cfg.pop("learn_logit_scale", None)  # a training setting: OpenCLIP's model has no such option
    pre = preprocess.to_dict()
    pre["size"] = pre.pop("image_size")
    return {"model_cfg": model_cfg, "preprocess_cfg": {**pre, "mode": "RGB", "fill_color": 0}}
