"""Hugging Face ``transformers.CLIPModel`` folders in and out, and the conversion between OpenAI's CLIP
state-dict layout and HF's.

HF splits each fused attention input projection into ``q_proj``/``k_proj``/``v_proj``, stores the
two output projections as transposed ``nn.Linear`` weights and renames every module; the config is
HF's ``CLIPConfig`` JSON (``text_config``, ``vision_config``, ``projection_dim``). ViT models only.
A folder holds ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``); ``export_hf`` adds the
tokenizer and image-processor files that ``CLIPProcessor`` reads, built from clipforge's own BPE merges
and preprocessing.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from clipforge.io.runs import CONFIG_NAME
from clipforge.io.tensors import Checkpoint, cpu_tensors, read_tensors, weights_file, write_model_folder
from clipforge.models.clip import CLIP
from clipforge.models.config import CLIPConfig
from clipforge.tokenizer import _WORD_PATTERN, EOT_TEXT, SOT_TEXT, _shared_bpe
from clipforge.transforms import PreprocessConfig

# HF's defaults for keys a config.json may leave out (transformers' CLIPTextConfig / CLIPVisionConfig).
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # HF hidden_act -> CLIPConfig.quick_gelu

# Renames outside the Transformer blocks: OpenAI key -> HF key.
_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
# Renames inside one block: OpenAI suffix -> HF suffix (the fused in_proj is handled separately).
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOWERS = {"transformer.resblocks.": "text_model.encoder.layers.",
           "visual.transformer.resblocks.": "vision_model.encoder.layers."}
_FROM_HF = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_PROJECTIONS_FROM_HF = {hf: ours for ours, hf in _PROJECTIONS.items()}
_BLOCK_FROM_HF = {hf: ours for ours, hf in _BLOCK.items()}
_HF_BLOCK = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_hf_config(meta: dict[str, Any]) -> bool:
    """Whether a folder's ``config.json`` contents are a ``CLIPModel``'s."""
    return meta.get("model_type") == "clip" or "vision_config" in meta


def read_hf_folder(path: Path, meta: dict[str, Any]) -> Checkpoint:
    """A ``CLIPModel`` folder's weights in OpenAI's layout, with its architecture; ``meta`` is its ``config.json``."""
    tensors, _ = read_tensors(weights_file(path, HF_WEIGHTS))
    return Checkpoint(to_openai_layout(tensors), config_from_hf(meta, source=str(path / CONFIG_NAME)), None,
                      path, "hf")


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
    return write_model_folder(Path(folder), openai_to_hf(cpu_tensors(model.state_dict())), meta, extra)


def to_openai_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` in OpenAI's layout: converted if it is in HF's, else as it is."""
    return hf_to_openai(state_dict) if is_hf_state_dict(state_dict) else state_dict


def is_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the keys are in ``transformers.CLIPModel``'s layout."""
    return any(k.startswith(("text_model.", "vision_model.")) for k in state_dict)


def hf_to_openai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ``CLIPModel`` state dict in OpenAI's layout (q/k/v fused, projections transposed)."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):  # a non-learned buffer that old HF files saved
            continue
        if key in _FROM_HF:
            out[_FROM_HF[key]] = value
        elif key in _PROJECTIONS_FROM_HF:
            out[_PROJECTIONS_FROM_HF[key]] = value.t().contiguous()  # nn.Linear (out, in) -> OpenAI's (in, out) matrix
        elif (m := _HF_BLOCK.match(key)) is not None:
            tower, index, module, kind = m.groups()
            prefix = ("transformer.resblocks." if tower == "text_model" else "visual.transformer.resblocks.") + index
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}.attn.in_proj_{kind}", {})[module.split(".")[1][0]] = value
            else:
                out[f"{prefix}.{_BLOCK_FROM_HF.get(module, module)}.{kind}"] = value
        else:
            out[key] = value  # left as is: the strict load reports it as unexpected
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"HF checkpoint has only the {sorted(parts)} projections for {key}; q, k and v are needed")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, D) or (3D,)
    return out


def openai_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI-layout ViT CLIP state dict in ``transformers.CLIPModel``'s layout."""
    out = {}
    for key, value in state_dict.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.t().contiguous()  # (in, out) -> nn.Linear's (out, in)
        else:
            tower = next((t for t in sorted(_TOWERS, key=len, reverse=True) if key.startswith(t)), None)
            if tower is None:
                raise ValueError(f"state-dict key {key!r} has no Hugging Face CLIPModel equivalent")
            index, rest = key[len(tower):].split(".", 1)
            prefix = f"{_TOWERS[tower]}{index}"
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # "weight" or "bias"
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                module, kind = rest.rsplit(".", 1)
                out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
    return out


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> CLIPConfig:
    """A ``CLIPConfig`` from an HF ``CLIPModel`` config.json dict."""
    text = {**_TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    vision = {**_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise ValueError(f"{source}: hidden_act {sorted(acts)} is not supported; clipforge needs one of "
                         f"{sorted(_ACTIVATIONS)} shared by both towers")
    for name, section in (("text_config", text), ("vision_config", vision)):
        if abs(float(section["layer_norm_eps"]) - 1e-5) > 1e-12:
            raise ValueError(f"{source}: {name}.layer_norm_eps={section['layer_norm_eps']} is not supported "
                             f"(clipforge's LayerNorm uses 1e-5)")
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
        raise ValueError(f"{source}: only square images and patches are supported, got image_size={image_size}, "
                         f"patch_size={patch_size}")
    return CLIPConfig.from_dict({
        "embed_dim": hf_config.get("projection_dim", 512),
        "quick_gelu": _ACTIVATIONS[acts.pop()],
        "vision_cfg": {"image_size": image_size, "layers": vision["num_hidden_layers"],
                       "width": vision["hidden_size"], "patch_size": patch_size,
                       "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                       "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
        "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                     "width": text["hidden_size"], "heads": text["num_attention_heads"],
                     "layers": text["num_hidden_layers"],
                     "mlp_ratio": text["intermediate_size"] / text["hidden_size"]},
    }, source=source)


def config_to_hf(cfg: CLIPConfig, logit_scale: float) -> dict[str, Any]:
    """HF ``CLIPModel`` config.json contents for a ViT ``CLIPConfig``."""
    if cfg.vision_cfg.is_resnet:
        raise ValueError("cannot export a ResNet CLIP to the Hugging Face layout: transformers' CLIPModel has "
                         "only a ViT image tower. Save it with clipforge.save(model, folder) instead")
    if cfg.text_cfg.hf_model_name or cfg.vision_cfg.timm_model_name:
        raise ValueError("cannot export a Hugging Face text tower or a timm image tower to transformers' "
                         "CLIPModel layout (it has only CLIP's own towers); save it with clipforge.save(model, "
                         "folder), which carries the tower's files")
    if cfg.text_cfg.encoder != "transformer":
        raise ValueError(f"cannot export a {cfg.text_cfg.encoder!r} text encoder to the Hugging Face layout: "
                         "transformers' CLIPModel has only the Transformer text tower")
    v, t = cfg.vision_cfg, cfg.text_cfg
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale,
        # HF pools the text at the first eos_token_id; clipforge pools at the largest id, which for
        # OpenAI's vocabulary is end-of-text (49407), so eos = vocab_size - 1 and bos the one below.
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim,
                        "bos_token_id": t.vocab_size - 2, "eos_token_id": t.vocab_size - 1, "pad_token_id": 1},
        "vision_config": {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "num_channels": 3,
                          "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": act,
                          "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim},
    }


# transformers' tokenizer files: OpenAI's "openai/clip-vit-*" folders pad with end-of-text.
_SPECIAL_TOKENS = {"bos_token": SOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT}
_RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values, as preprocessor_config.json stores them


def hf_tokenizer_files(context_length: int) -> dict[str, str]:
    """File name -> text of ``CLIPTokenizer``'s files (``vocab.json``, ``merges.txt``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json``), from clipforge's BPE vocabulary and merges."""
    bpe = _shared_bpe()
    merges = sorted(bpe.ranks, key=bpe.ranks.get)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **_SPECIAL_TOKENS}
    return {
        "vocab.json": json.dumps(bpe.encoder, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer.json": json.dumps(_fast_tokenizer(bpe.encoder, merges), ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(_SPECIAL_TOKENS, indent=2),
    }


def _fast_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, Any]:
    """The ``tokenizers`` library's JSON for CLIP's tokenizer: normalise (NFC, whitespace, lower case), split
    with OpenAI's word pattern, byte-level BPE with ``</w>`` word ends, then start/end of text around."""
    special = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for t in (SOT_TEXT, EOT_TEXT)]
    words = r"<\|startoftext\|>|<\|endoftext\|>|" + _WORD_PATTERN
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": words}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOT_TEXT, vocab[EOT_TEXT]],
                           "cls": [SOT_TEXT, vocab[SOT_TEXT]], "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": EOT_TEXT, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }


def hf_preprocessor_config(preprocess: PreprocessConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``CLIPImageProcessor``: the same resize, crop and normalisation."""
    size = preprocess.image_size
    if preprocess.resize_mode == "longest":
        raise ValueError("cannot describe resize_mode='longest' (resize the long side, then pad) to transformers' "
                         "CLIPImageProcessor, which only crops or squashes; export a model saved with "
                         "resize_mode 'shortest' or 'squash'")
    crop = preprocess.resize_mode == "shortest"  # resize the short side, centre crop; "squash": resize to a square
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_resize": True, "size": {"shortest_edge": size} if crop else {"height": size, "width": size},
            "resample": _RESAMPLE[preprocess.interpolation], "do_center_crop": crop,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(preprocess.mean), "image_std": list(preprocess.std),
            "do_convert_rgb": True}
