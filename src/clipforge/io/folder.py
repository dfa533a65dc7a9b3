"""clipforge's own model folder: ``model.safetensors`` + ``config.json`` (``format``, ``version``,
``clipforge_version``, ``model_cfg``, ``preprocess_cfg``), so loading it never guesses; a Hugging Face text
tower's files in ``hf_text/``; and ``open_clip_config.json`` beside them when OpenCLIP can build the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipforge import __version__
from clipforge.io.open_clip import OPEN_CLIP_CONFIG, open_clip_can_build, open_clip_config, read_preprocess
from clipforge.io.runs import CONFIG_NAME, HF_TEXT_DIR, WEIGHTS_NAME, write_folder
from clipforge.io.tensors import Checkpoint, CheckpointError, cpu_tensors, read_tensors, write_model_folder
from clipforge.models.clip import CLIP
from clipforge.models.config import CLIPConfig
from clipforge.transforms import PreprocessConfig

FORMAT, FORMAT_VERSION = "clipforge", 1
_OUR_CONFIG_KEYS = ("format", "version", "clipforge_version", "model_cfg", "preprocess_cfg")  # what save writes


def is_our_config(meta: dict[str, Any]) -> bool:
    """Whether a folder's ``config.json`` contents are ours (not Hugging Face's, which has the same name)."""
    return meta.get("format") == FORMAT


def read_our_folder(path: Path, meta: dict[str, Any]) -> Checkpoint:
    """A clipforge folder's weights, config and preprocessing; ``meta`` is its ``config.json``."""
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_NAME}: written by a newer clipforge (format version "
                              f"{meta['version']} > {FORMAT_VERSION}); upgrade clipforge to load it")
    unknown = sorted(set(meta) - set(_OUR_CONFIG_KEYS))
    if unknown:
        raise CheckpointError(f"{path / CONFIG_NAME}: unknown key(s) {unknown}; a clipforge config.json holds "
                              f"only {', '.join(_OUR_CONFIG_KEYS)} (a typo, or a file edited by hand?)")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: has config.json but no {WEIGHTS_NAME}")
    tensors, _ = read_tensors(weights)
    source = str(path / CONFIG_NAME)
    config = _resolve_packaged(CLIPConfig.from_dict(meta, source=source), path)
    return Checkpoint(tensors, config, read_preprocess(meta, source), path, FORMAT)


def _resolve_packaged(config: CLIPConfig, folder: Path) -> CLIPConfig:
    """A saved config names its packaged tokenizer and model files relative to its folder."""
    name = config.text_cfg.hf_model_name
    if name and (folder / name).is_dir() and not Path(name).is_absolute():
        packaged = str((folder / name).absolute())
        tokenizer = config.text_cfg.hf_tokenizer_name
        return config.replace(hf_model_name=packaged, hf_model_pretrained=False,
                              hf_tokenizer_name=packaged if tokenizer in (None, name) else tokenizer)
    return config


def save(model: CLIP, folder: str | Path, preprocess: Any = None) -> Path:
    """Save ``model`` as a clipforge checkpoint folder: ``model.safetensors`` + ``config.json``, and
    ``open_clip_config.json`` so ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` loads it too.

    ``preprocess`` is a ``PreprocessConfig``, its dict, or a transform from ``load`` (default: OpenAI's
    preprocessing at the model's image size). Files are written to temporaries and renamed,
    ``config.json`` last, so an interrupted save never leaves a folder that looks complete.
    """
    if preprocess is None:
        preprocess = PreprocessConfig(image_size=model.image_size)
    if isinstance(preprocess, dict):
        preprocess = PreprocessConfig.from_dict(preprocess)
    preprocess = getattr(preprocess, "config", preprocess)  # EvalTransform / TrainTransform carry theirs
    if not isinstance(preprocess, PreprocessConfig):
        raise TypeError(f"preprocess must be a PreprocessConfig, its dict, a transform or None, "
                        f"got {type(preprocess).__name__}")
    config = _package_hf_text(model, Path(folder))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "clipforge_version": __version__,
            "model_cfg": config.to_dict(), "preprocess_cfg": preprocess.to_dict()}
    extra = {}
    (Path(folder) / OPEN_CLIP_CONFIG).unlink(missing_ok=True)  # an interrupted save must not pair it with new weights
    if open_clip_can_build(model.config):
        open_clip = json.dumps(open_clip_config(config, preprocess), indent=2)
        extra[OPEN_CLIP_CONFIG] = lambda p: p.write_text(open_clip)
    return write_model_folder(Path(folder), cpu_tensors(model.state_dict()), meta, extra)


def _package_hf_text(model: CLIP, folder: Path) -> CLIPConfig:
    """Write a Hugging Face text tower's model config and tokenizer into ``folder/hf_text`` and return the
    config to save, naming that folder: a saved model then loads with no hub access and no source folder."""
    if model.text is None:
        return model.config
    from clipforge.tokenizer import model_tokenizer

    def fill(target: Path) -> None:
        model.text.hf_config.save_pretrained(str(target))
        model_tokenizer(model).save(target)

    write_folder(folder / HF_TEXT_DIR, fill)
    return model.config.replace(hf_model_name=HF_TEXT_DIR, hf_tokenizer_name=HF_TEXT_DIR, hf_model_pretrained=False)
