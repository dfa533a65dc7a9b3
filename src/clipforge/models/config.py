"""Architecture configuration: frozen dataclasses that round-trip to JSON.

The JSON schema is OpenCLIP's model-config schema (``embed_dim``, ``vision_cfg``, ``text_cfg``,
``quick_gelu``), so OpenCLIP config files load unchanged; ``text_cfg.encoder = "cbow"`` selects the
paper's continuous-bag-of-words text baseline.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OpenCLIP keys that do not change the architecture we build, accepted and dropped.
_IGNORED_KEYS = {"custom_text", "output_tokens", "patch_dropout", "output_dict"}
# OpenCLIP keys that change the architecture in ways clipforge does not implement; accepted only
# when they hold their neutral value.
_NEUTRAL_VALUES = {
    "ls_init_value": (None,),
    "attentional_pool": (False,), "no_ln_pre": (False,), "final_ln_after_pool": (False,),
    "pool_type": ("argmax", "tok"), "proj_bias": (False,), "embed_cls": (False,),
    "pad_id": (0,), "input_patchnorm": (False,), "global_average_pool": (False,),
    "act_kwargs": (None, {}), "norm_kwargs": (None, {}), "cast_dtype": (None,),
    "init_logit_bias": (None,), "proj_type": ("linear",), "tokenizer_kwargs": (None, {}),
    "text_mask": ("first", "last"),
}

# The option tables of the configs below, each defined here only.
OBJECTIVES = ("contrastive", "bow", "caption", "classify")  # CLIPConfig.objective: CLIP, then sec. 2.3's baselines
PROJECTIONS = ("linear", "mlp")  # CLIPConfig.projection: CLIP's linear, or SimCLR's MLP after it (sec. 2.4)
TEXT_ENCODERS = ("transformer", "cbow")  # TextConfig.encoder
# TextConfig.hf_pooler_type: OpenCLIP's pooler names and the short names clipforge also accepts -> the pooling
# models/hf_text.py applies; TextConfig.hf_proj_type (None: no projection when the widths are equal).
HF_POOLERS = {"mean_pooler": "mean", "mean": "mean", "cls_pooler": "cls_pooler", "cls": "cls",
              "cls_last_hidden_state_pooler": "cls", "last_token_pooler": "last-token", "last-token": "last-token"}
HF_PROJECTIONS = ("linear", "mlp", None)
TIMM_PROJECTIONS = ("linear", "mlp", None, "")  # VisionConfig.timm_proj (None or "": none)


@dataclass(frozen=True)
class VisionConfig:
    """Image tower: a ViT when ``layers`` is an int, OpenAI's modified ResNet when it is 4 ints."""

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    patch_size: int | None = 32
    head_width: int = 64
    mlp_ratio: float = 4.0
    # a timm image tower (models/timm_vision.py) when timm_model_name is set, as OpenCLIP's TimmModel
    timm_model_name: str | None = None
    timm_model_pretrained: bool | str = False  # a path: a local timm checkpoint file
    timm_pool: str = "avg"
    timm_proj: str | None = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: float | None = None

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        # OpenAI: ViT heads = width / 64; ResNet attention-pool heads = (width * 32) / 64.
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass(frozen=True)
class TextConfig:
    """Text tower: OpenAI's causal Transformer, or ``encoder="cbow"`` (mean of token embeddings)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    encoder: str = "transformer"
    # a Hugging Face text tower (models/hf_text.py) when hf_model_name (a hub name or a folder) is set
    hf_model_name: str | None = None
    hf_tokenizer_name: str | None = None
    hf_model_pretrained: bool = True
    hf_pooler_type: str = "mean_pooler"
    hf_proj_type: str | None = "mlp"


# Top-level fields left out of ``to_dict`` at their defaults, so configs of CLIP models stay as they were.
_OMITTED_AT_DEFAULT = {"objective": "contrastive", "projection": "linear", "learn_logit_scale": True,
                       "classnames": None}


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP architecture: two towers projected into an ``embed_dim`` joint space.

    ``objective`` other than "contrastive" builds the paper's sec. 2.3 baselines, an image tower without a
    text encoder: "bow" (bag-of-words head), "caption" (a causal decoder attending to the image tokens) or
    "classify" (a head over ``classnames``). ``projection="mlp"`` adds ReLU + Linear after each tower's
    projection (SimCLR's head, sec. 2.4); ``learn_logit_scale=False`` fixes the temperature (sec. 2.5).
    """

    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    objective: str = "contrastive"
    projection: str = "linear"
    learn_logit_scale: bool = True
    classnames: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.classnames is not None:
            object.__setattr__(self, "classnames", tuple(self.classnames))
        _check_objective(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, default in _OMITTED_AT_DEFAULT.items():
            if d[key] == default:
                del d[key]
        if "classnames" in d:
            d["classnames"] = list(d["classnames"])
        for section, switch, prefix in (("vision_cfg", "timm_model_name", "timm_"), ("text_cfg", "hf_model_name", "hf_")):
            if d[section][switch] is None:  # configs of the built-in towers stay as they were
                d[section] = {k: v for k, v in d[section].items() if not k.startswith(prefix)}
        if self.vision_cfg.is_resnet:
            d["vision_cfg"]["layers"] = list(self.vision_cfg.layers)
            d["vision_cfg"]["patch_size"] = None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **overrides: Any) -> "CLIPConfig":
        """A copy with overrides; ``image_size=336`` or ``context_length=32`` reach into the towers."""
        vision = {k: overrides.pop(k) for k in list(overrides) if k in _fields(VisionConfig)}
        text = {k: overrides.pop(k) for k in list(overrides) if k in _fields(TextConfig)}
        unknown = set(overrides) - _fields(CLIPConfig)
        if unknown:
            raise TypeError(f"unknown model override(s) {sorted(unknown)}; valid ones are "
                            f"{sorted(_fields(CLIPConfig) | _fields(VisionConfig) | _fields(TextConfig))}")
        if "layers" in vision and isinstance(vision["layers"], list):
            vision["layers"] = tuple(vision["layers"])
        return dataclasses.replace(
            self, vision_cfg=dataclasses.replace(self.vision_cfg, **vision),
            text_cfg=dataclasses.replace(self.text_cfg, **text), **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "CLIPConfig":
        """Build from an OpenCLIP-schema dict; unsupported architecture options raise ValueError."""
        d = dict(d)
        if "model_cfg" in d:  # our saved config.json and OpenCLIP's open_clip_config.json
            d = dict(d["model_cfg"])
        vision = _section(d.pop("vision_cfg", {}), VisionConfig, f"{source}: vision_cfg")
        text = _section(_hf_aliases(d.pop("text_cfg", {})), TextConfig, f"{source}: text_cfg")
        top = _section(d, CLIPConfig, source, skip={"vision_cfg", "text_cfg"})
        if isinstance(vision.get("layers"), (list, tuple)):
            if len(vision["layers"]) != 4:
                raise ValueError(f"{source}: vision_cfg.layers must be an int (ViT) or 4 ints (ResNet), "
                                 f"got {vision['layers']}")
            vision["layers"] = tuple(int(x) for x in vision["layers"])
            vision["patch_size"] = None
        elif vision.get("patch_size", 32) is None:
            raise ValueError(f"{source}: a ViT (integer vision_cfg.layers) needs a patch_size")
        _check_foreign_towers(vision, text, source)
        if text.get("encoder", "transformer") not in TEXT_ENCODERS:
            raise ValueError(f"{source}: text_cfg.encoder must be 'transformer' or 'cbow', got {text['encoder']!r}")
        try:
            return cls(vision_cfg=VisionConfig(**vision), text_cfg=TextConfig(**text), **top)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"model config {path} must hold a JSON object")
        return cls.from_dict(data, source=str(path))


def _check_objective(cfg: CLIPConfig) -> None:
    """ValueError for an unknown objective or projection, or a classify model without its class names."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.projection not in PROJECTIONS:
        raise ValueError(f"projection must be 'linear' or 'mlp', got {cfg.projection!r}")
    if (cfg.objective == "classify") != (cfg.classnames is not None):
        raise ValueError("a 'classify' model needs classnames (its classes in label order) and only it takes "
                         f"them; got objective {cfg.objective!r} with classnames {cfg.classnames!r}")
    if cfg.classnames is not None and (not cfg.classnames or len(set(cfg.classnames)) != len(cfg.classnames)
                                       or not all(isinstance(c, str) for c in cfg.classnames)):
        raise ValueError(f"classnames must be distinct strings, at least one; got {list(cfg.classnames)[:10]}")
    if cfg.objective != "contrastive" and (cfg.vision_cfg.timm_model_name or cfg.text_cfg.hf_model_name):
        raise ValueError(f"objective {cfg.objective!r} is built on clipforge's own towers only; remove "
                         "vision_cfg.timm_model_name / text_cfg.hf_model_name or use objective 'contrastive'")


def _hf_aliases(text: Any) -> Any:
    """Older OpenCLIP configs name the Hugging Face pooler and projection ``pooler_type`` and ``proj``."""
    if not isinstance(text, dict) or not text.get("hf_model_name"):
        return text
    text = dict(text)
    for old, new in (("pooler_type", "hf_pooler_type"), ("proj", "hf_proj_type")):
        if old in text:
            text.setdefault(new, text.pop(old))
    return text


def _check_foreign_towers(vision: dict[str, Any], text: dict[str, Any], source: str) -> None:
    if text.get("hf_model_name"):
        if text.get("hf_pooler_type", "mean_pooler") not in HF_POOLERS:
            raise ValueError(f"{source}: text_cfg.hf_pooler_type must be one of {sorted(HF_POOLERS)}, "
                             f"got {text['hf_pooler_type']!r}")
        if text.get("hf_proj_type", "mlp") not in HF_PROJECTIONS:
            raise ValueError(f"{source}: text_cfg.hf_proj_type must be 'linear', 'mlp' or null, "
                             f"got {text['hf_proj_type']!r}")
    if vision.get("timm_model_name") and vision.get("timm_proj", "linear") not in TIMM_PROJECTIONS:
        raise ValueError(f"{source}: vision_cfg.timm_proj must be 'linear', 'mlp' or null, got {vision['timm_proj']!r}")


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _section(d: dict[str, Any], cls, where: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
    known, out = _fields(cls), {}
    for key, value in d.items():
        if key in known:
            out[key] = value
        elif key in skip or key in _IGNORED_KEYS:
            continue
        elif key in _NEUTRAL_VALUES:
            if value not in _NEUTRAL_VALUES[key]:
                raise ValueError(f"{where}: option {key}={value!r} is not supported by clipforge "
                                 f"(only {_NEUTRAL_VALUES[key]!r}); remove it or use OpenCLIP for this model")
        else:
            raise ValueError(f"{where}: unknown option {key!r}; valid options are {sorted(known)}")
    return out
