"""CLIP checkpoints in and out: clipforge folders, OpenAI's TorchScript/state-dict files, OpenCLIP and HF.

Our format is a folder holding ``model.safetensors`` and ``config.json`` (``model_cfg``, ``preprocess_cfg``),
so loading it never guesses. Foreign weights are converted to OpenAI's key layout; a file without a config
gets its architecture read from tensor shapes, as OpenAI's ``clip.model.build_model`` does.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipforge import __version__
from clipforge.io.hf import (config_from_hf, config_to_hf, hf_preprocessor_config, hf_to_openai, hf_tokenizer_files,
                 is_hf_state_dict, openai_to_hf)
from clipforge.models.clip import CLIP
from clipforge.models.config import CLIPConfig
from clipforge.io.runs import (CONFIG_NAME, HF_TEXT_DIR, WEIGHTS_NAME, is_run_dir, latest_checkpoint, step_folders, write_files,
                   write_folder)
from clipforge.io.openai import TorchScriptError, read_torchscript
from clipforge.transforms import PreprocessConfig

FORMAT, FORMAT_VERSION = "clipforge", 1
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# OpenCLIP's ``local-dir:`` loader reads this config and finds our model.safetensors beside it.
OPEN_CLIP_CONFIG = "open_clip_config.json"
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # scalars in OpenAI's archives
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_OUR_CONFIG_KEYS = ("format", "version", "clipforge_version", "model_cfg", "preprocess_cfg")  # what save writes


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


@dataclass
class Checkpoint:
    """Weights in OpenAI's key layout, with the config and preprocessing they came with (if any)."""

    state_dict: dict[str, torch.Tensor]
    config: CLIPConfig | None  # None: a foreign file without a config; see infer_config
    preprocess: PreprocessConfig | None
    path: Path
    format: str  # "clipforge", "hf", "open_clip", "torchscript", "safetensors" or "torch"


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint file or folder into OpenAI's layout.

    Files: OpenAI's TorchScript archives and state dicts, OpenCLIP ``.pt``/``.bin``/``.safetensors``
    (with or without a ``state_dict`` wrapper or ``module.`` prefixes). Folders: ours, Hugging Face
    ``CLIPModel`` (``config.json`` + weights), OpenCLIP hub folders, and training run directories
    (the newest complete ``checkpoints/step_*``).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_folder(path)
    tensors, kind = read_tensors(path)
    return Checkpoint(tensors, None, None, path, kind)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A weights file -> (state dict in OpenAI's layout, file kind); never unpickles arbitrary objects."""
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
    return _to_openai_layout(_unwrap(obj, path)), kind


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


def _to_openai_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if is_hf_state_dict(state_dict):
        state_dict = hf_to_openai(state_dict)
    return {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRA_KEYS}


def _read_folder(path: Path) -> Checkpoint:
    if is_run_dir(path):
        return _read_folder(_newest_checkpoint(path))
    ours = _read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
    if ours.get("format") == FORMAT:  # before open_clip_config.json, which clipforge.save writes too
        return _read_ours(path, ours)
    if (path / OPEN_CLIP_CONFIG).is_file() and any((path / name).is_file() for name in _OPEN_CLIP_WEIGHTS):
        source = str(path / OPEN_CLIP_CONFIG)
        meta = _read_json(path / OPEN_CLIP_CONFIG)
        tensors, _ = read_tensors(_weights_file(path, _OPEN_CLIP_WEIGHTS))
        return Checkpoint(tensors, CLIPConfig.from_dict(meta, source=source), _preprocess(meta, source),
                          path, "open_clip")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        detail = "; it holds model.safetensors but no config.json: an incomplete (interrupted?) save" \
            if (path / WEIGHTS_NAME).is_file() else f"; it holds {sorted(p.name for p in path.iterdir())[:8]}"
        raise CheckpointError(
            f"folder {path} is not a checkpoint: it has neither clipforge's files (model.safetensors + "
            f"config.json) nor a Hugging Face CLIPModel's (config.json + model.safetensors or "
            f"pytorch_model.bin){detail}")
    meta = ours
    if meta.get("model_type") == "clip" or "vision_config" in meta:
        tensors, _ = read_tensors(_weights_file(path, _HF_WEIGHTS))
        return Checkpoint(tensors, config_from_hf(meta, source=str(config_path)), None, path, "hf")
    raise CheckpointError(f"{config_path}: neither a clipforge checkpoint config (\"format\": \"clipforge\") "
                          f"nor a Hugging Face CLIPModel config (\"model_type\": \"clip\")")


def _read_ours(path: Path, meta: dict[str, Any]) -> Checkpoint:
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
    return Checkpoint(tensors, config, _preprocess(meta, source), path, FORMAT)


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


def _resolve_packaged(config: CLIPConfig, folder: Path) -> CLIPConfig:
    """A saved config names its packaged tokenizer and model files relative to its folder."""
    name = config.text_cfg.hf_model_name
    if name and (folder / name).is_dir() and not Path(name).is_absolute():
        packaged = str((folder / name).absolute())
        tokenizer = config.text_cfg.hf_tokenizer_name
        return config.replace(hf_model_name=packaged, hf_model_pretrained=False,
                              hf_tokenizer_name=packaged if tokenizer in (None, name) else tokenizer)
    return config


def _preprocess(meta: dict[str, Any], source: str) -> PreprocessConfig | None:
    cfg = meta.get("preprocess_cfg")
    return None if cfg is None else PreprocessConfig.from_dict(cfg, source=f"{source}: preprocess_cfg")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _weights_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"folder {folder} has a config but no weights file (one of {', '.join(names)})")


def _newest_checkpoint(run_dir: Path) -> Path:
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise CheckpointError(f"run directory {run_dir} has no complete checkpoint: no checkpoints/step_* folder "
                              f"holds both {WEIGHTS_NAME} and {CONFIG_NAME} (found {len(step_folders(run_dir))} "
                              f"step folders)")
    return folder


def infer_config(state_dict: dict[str, torch.Tensor], quick_gelu: bool = True,
                 source: str = "state dict") -> CLIPConfig:
    """Read the architecture from tensor shapes, as OpenAI's ``build_model`` does.

    Attention heads are not visible in shapes: OpenAI's rule (64 channels per head) is assumed, and
    ``quick_gelu`` defaults to True as OpenAI's weights were trained with it.
    """
    try:
        vision = _infer_vision(state_dict)
        text = _infer_text(state_dict)
        embed_dim = state_dict["text_projection"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{source}: cannot infer the architecture, key {e} is missing; this does not look "
                              f"like a CLIP checkpoint (its first keys: {sorted(state_dict)[:6]})") from e
    return CLIPConfig.from_dict({"embed_dim": embed_dim, "quick_gelu": quick_gelu,
                                 "vision_cfg": vision, "text_cfg": text}, source=source)


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _head_width(width: int) -> int:
    return math.gcd(width, 64)  # 64 for every OpenAI width; a divisor of any other


def _infer_vision(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "visual.proj" in sd:  # ViT
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
        return {"image_size": patch * grid, "layers": _count_blocks(sd, "visual.transformer.resblocks."),
                "width": width, "patch_size": patch, "head_width": _head_width(width),
                "mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width}
    layers = [_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)]
    grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)  # image_size / 32
    width = sd["visual.layer1.0.conv1.weight"].shape[0]
    return {"image_size": grid * 32, "layers": layers, "width": width, "head_width": _head_width(width * 32)}


def _infer_text(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    vocab_size, width = sd["token_embedding.weight"].shape
    if "positional_embedding" not in sd:  # the CBOW baseline has no positions and no Transformer
        return {"vocab_size": vocab_size, "width": width, "encoder": "cbow"}
    return {"context_length": sd["positional_embedding"].shape[0], "vocab_size": vocab_size, "width": width,
            "heads": width // _head_width(width), "layers": _count_blocks(sd, "transformer.resblocks."),
            "mlp_ratio": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width}


def resize_positional_embeddings(state_dict: dict[str, torch.Tensor],
                                 model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fit positional embeddings to the model: image grids by bicubic interpolation, text by truncation.

    The class-token (ViT) or mean-token (ResNet attention pool) row is kept as is; the text rows are
    truncated only (a causal model's first positions do not depend on later ones).
    """
    target = model.state_dict()
    out = dict(state_dict)
    for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if key in out and key in target and out[key].shape != target[key].shape:
            out[key] = _resize_grid(out[key], target[key].shape[0])
    key = "positional_embedding"
    if key in out and key in target and out[key].shape[0] > target[key].shape[0]:
        out[key] = out[key][: target[key].shape[0]]
    return out


def _resize_grid(pos: torch.Tensor, new_len: int) -> torch.Tensor:
    old, new = math.isqrt(pos.shape[0] - 1), math.isqrt(new_len - 1)
    if old * old != pos.shape[0] - 1 or new * new != new_len - 1:
        return pos  # not square grids: left for the shape check to report
    grid = pos[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1)  # (new*new, D)
    return torch.cat([pos[:1], grid.to(pos.dtype)], dim=0)


def load_weights(model: CLIP, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                 assign: bool = False) -> None:
    """Strictly load OpenAI-layout weights, resizing positional embeddings; mismatches raise CheckpointError."""
    state_dict = resize_positional_embeddings(state_dict, model)
    target = model.state_dict()
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    problems = [f"{label} ({len(items)}): {'; '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (("shape mismatches", mismatched), ("missing keys", missing),
                                     ("unexpected keys", unexpected)) if items]
    if problems:
        raise CheckpointError(
            f"{source} does not fit the model architecture -- {' | '.join(problems)}. Is it a checkpoint of "
            f"another architecture? clipforge.load(path) reads a checkpoint's own config (or infers it)")
    model.load_state_dict(state_dict, strict=True, assign=assign)


def _warn_unknown_activation(path: Path) -> None:
    warnings.warn(f"{path}: the file records no config, so its activation (GELU or QuickGELU) cannot be known; "
                  f"assuming QuickGELU as OpenAI's weights need. OpenCLIP models named without '-quickgelu' "
                  f"(e.g. ViT-B-32 laion2b_s34b_b79k) use GELU: load those with "
                  f"clipforge.create_model('ViT-B-32', pretrained=path)", UserWarning, stacklevel=3)


def model_from_checkpoint(checkpoint: Checkpoint, config: CLIPConfig | None = None, take: bool = False,
                          **overrides: Any) -> CLIP:
    """A CLIP (fp32, CPU) holding the checkpoint's weights.

    The architecture is ``config`` if given, else the checkpoint's own, else inferred from shapes; then
    ``overrides`` (e.g. ``image_size=336``) are applied and positional embeddings resized to fit. The
    model's tensors are copies, unless ``take``: then a float32 tensor that owns all of its storage becomes
    the model's own, which saves a copy of every weight when nothing else will use the checkpoint.
    """
    if config is None and checkpoint.config is None:
        config = infer_config(checkpoint.state_dict, source=str(checkpoint.path))
        if checkpoint.format != "torchscript":  # OpenAI's release format: always QuickGELU
            _warn_unknown_activation(checkpoint.path)
    config = config or checkpoint.config
    config = config.replace(**overrides) if overrides else config
    foreign = config.text_cfg.hf_model_name or config.vision_cfg.timm_model_name
    with torch.device("cpu" if foreign else "meta"):  # meta: no random init, every tensor comes from the
        model = CLIP(config)  # checkpoint; Hugging Face and timm towers hold buffers outside the state dict
    # Copies: the model must not share storage with a checkpoint that may build another model, nor its
    # parameters storage with each other (views of one tensor, as a fused qkv split into three).
    state_dict = {k: v if take and _owns_storage(v) and v.dtype == torch.float32
                  else v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                  for k, v in checkpoint.state_dict.items()}
    load_weights(model, state_dict, str(checkpoint.path), assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer: not in any state dict, so assign=True cannot fill it
        raise RuntimeError(f"clipforge bug: {left} are not restored from a checkpoint; build the model on CPU")
    return model


def _owns_storage(tensor: torch.Tensor) -> bool:
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


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
    if _open_clip_can_build(model.config):
        open_clip = json.dumps(open_clip_config(config, preprocess), indent=2)
        extra[OPEN_CLIP_CONFIG] = lambda p: p.write_text(open_clip)
    return _write_folder(Path(folder), _cpu_tensors(model.state_dict()), meta, extra)


def _open_clip_can_build(config: CLIPConfig) -> bool:
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


def export_hf(model: CLIP, folder: str | Path, preprocess: PreprocessConfig | None = None) -> Path:
    """Write ``model`` as a Hugging Face ``CLIPModel`` folder: ``config.json``, ``model.safetensors``, the
    tokenizer files and ``preprocessor_config.json`` (``preprocess``, default OpenAI's at the model's size).

    ``CLIPModel``, ``CLIPProcessor``/``AutoProcessor``, ``CLIPTokenizer``/``AutoTokenizer`` and
    ``pipeline("zero-shot-image-classification", model=folder)`` then work from the folder alone and give
    clipforge's features and ids. ViT models with the Transformer text tower only: HF has no ResNet or CBOW CLIP.
    """
    if model.config.objective != "contrastive" or model.config.projection != "linear":
        raise ValueError(f"a Hugging Face CLIPModel has two towers with linear projections; this model is "
                         f"objective={model.config.objective!r}, projection={model.config.projection!r}: "
                         f"save it with clipforge.save instead")
    meta = config_to_hf(model.config, model.logit_scale.item())
    preprocess = getattr(preprocess, "config", preprocess) or PreprocessConfig(image_size=model.image_size)
    files = {**hf_tokenizer_files(model.context_length),
             "preprocessor_config.json": json.dumps(hf_preprocessor_config(preprocess), indent=2)}
    extra = {name: (lambda p, text=text: p.write_text(text, encoding="utf-8")) for name, text in files.items()}
    return _write_folder(Path(folder), openai_to_hf(_cpu_tensors(model.state_dict())), meta, extra)


def _cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _write_folder(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> Path:
    """Weights, then the ``extra`` files (name -> writer), then ``config.json``, which marks the folder complete."""
    folder.mkdir(parents=True, exist_ok=True)
    write_files(folder, {
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        **(extra or {}),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2)),
    })
    return folder
