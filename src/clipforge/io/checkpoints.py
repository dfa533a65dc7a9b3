"""Any checkpoint in, as a model: which format a file or folder holds (each read by its own module), the
architecture of a foreign file that carries no config (from tensor shapes, as OpenAI's
``clip.model.build_model``), positional embeddings fitted to the model, and a strict load.

Files: ``tensors.py`` (safetensors, torch.save, TorchScript). Folders: ours (``folder.py``), OpenCLIP's
(``open_clip.py``), Hugging Face's (``hf.py``) and training runs (``runs.py``: the newest checkpoint).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.io.folder import is_our_config, read_our_folder
from clipforge.io.hf import is_hf_config, read_hf_folder, to_openai_layout
from clipforge.io.open_clip import is_open_clip_folder, read_open_clip_folder
from clipforge.io.runs import CONFIG_NAME, WEIGHTS_NAME, is_run_dir, latest_checkpoint, step_folders
from clipforge.io.tensors import Checkpoint, CheckpointError, read_json, read_tensors
from clipforge.models.clip import CLIP
from clipforge.models.config import CLIPConfig


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
    return Checkpoint(to_openai_layout(tensors), None, None, path, kind)


def _read_folder(path: Path) -> Checkpoint:
    if is_run_dir(path):
        return _read_folder(_newest_checkpoint(path))
    config_path = path / CONFIG_NAME
    meta = read_json(config_path) if config_path.is_file() else {}
    if is_our_config(meta):  # before open_clip_config.json, which clipforge.save writes too
        return read_our_folder(path, meta)
    if is_open_clip_folder(path):
        return read_open_clip_folder(path)
    if not config_path.is_file():
        detail = "; it holds model.safetensors but no config.json: an incomplete (interrupted?) save" \
            if (path / WEIGHTS_NAME).is_file() else f"; it holds {sorted(p.name for p in path.iterdir())[:8]}"
        raise CheckpointError(
            f"folder {path} is not a checkpoint: it has neither clipforge's files (model.safetensors + "
            f"config.json) nor a Hugging Face CLIPModel's (config.json + model.safetensors or "
            f"pytorch_model.bin){detail}")
    if is_hf_config(meta):
        return read_hf_folder(path, meta)
    raise CheckpointError(f"{config_path}: neither a clipforge checkpoint config (\"format\": \"clipforge\") "
                          f"nor a Hugging Face CLIPModel config (\"model_type\": \"clip\")")


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
