"""Zero-shot classification (Radford et al. 2021, sec. 3.1.4): class names + prompt templates -> a linear classifier.

Each class embedding is the renormalised mean of its L2-normalised prompt embeddings (prompt ensembling);
templates use ``{}`` or ``{c}`` for the class name, as in OpenAI's notebook and CLIP_benchmark's JSON.
"""
from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .tokenizer import get_tokenizer

DEFAULT_TEMPLATES = ("a photo of a {}.",)
PLACEHOLDERS = ("{c}", "{}")
TEMPLATE_ALIASES = {"openai": "imagenet1k"}
_CACHE_SIZE = 16
_cache: OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]] = OrderedDict()


@lru_cache(maxsize=1)
def _asset_json(name: str) -> dict:
    return json.loads((resources.files("clipforge") / "assets" / name).read_text(encoding="utf-8"))


def template_set_names() -> list[str]:
    """Names accepted by :func:`load_templates`: CLIP_benchmark's per-dataset sets plus 'openai' and 'default'."""
    return sorted({*_asset_json("en_zeroshot_classification_templates.json"), *TEMPLATE_ALIASES, "default"})


def classname_set_names() -> list[str]:
    """Names accepted by :func:`load_classnames`: the class-name lists shipped in ``assets/en_classnames.json``."""
    return sorted(_asset_json("en_classnames.json"))


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """``templates`` as a list, or ValueError if it is empty or a template has no ``{}``/``{c}`` placeholder."""
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where}: no templates given; pass at least one, e.g. 'a photo of a {{}}.'")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or not any(p in t for p in PLACEHOLDERS):
            raise ValueError(f"{where}: template {i + 1} {t!r} has no class placeholder; "
                             "write '{}' or '{c}' where the class name goes, e.g. 'a photo of a {}.'")
    return templates


def check_classnames(classnames: Sequence[str], where: str = "class names", unique: bool = True) -> list[str]:
    """``classnames`` as a list, or ValueError for an empty list, an empty name or (if ``unique``) a duplicate."""
    names = list(classnames)
    if not names:
        raise ValueError(f"{where}: no class names given")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: class {i + 1} is an empty string; every label needs some text")
        if unique and name in seen:
            raise ValueError(f"{where}: {name!r} appears twice (positions {seen[name] + 1} and {i + 1}); "
                             "class names must be unique")
        seen[name] = i
    return names


def fill_template(template: str, classname: str) -> str:
    """The prompt for one class: every ``{c}`` and ``{}`` replaced by ``classname``."""
    for placeholder in PLACEHOLDERS:
        template = template.replace(placeholder, classname)
    return template


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_templates(spec: str | Path | Sequence[str] | None = None) -> list[str]:
    """Prompt templates from a set name, a file (one template per line), one literal template, or a list.

    ``None`` or ``"default"`` -> ``["a photo of a {}."]``; ``"openai"`` = ``"imagenet1k"`` (OpenAI's 80);
    other names are CLIP_benchmark's per-dataset sets (``cifar10``, ``food101``, ``pets``, ...).
    """
    if spec is None or spec == "default":
        return list(DEFAULT_TEMPLATES)
    if not isinstance(spec, (str, Path)):
        return check_templates(spec)
    text = str(spec)
    sets = _asset_json("en_zeroshot_classification_templates.json")
    name = TEMPLATE_ALIASES.get(text, text)
    if name in sets:
        return check_templates(sets[name], f"template set {text!r}")
    if Path(text).is_file():
        return check_templates(_read_lines(Path(text)), f"template file {text}")
    if any(p in text for p in PLACEHOLDERS):
        return [text]
    raise ValueError(f"templates {text!r}: not a template set, not a file and no '{{}}' placeholder. "
                     f"Sets: {', '.join(template_set_names())}")


def load_classnames(spec: str | Path) -> list[str]:
    """Class names from a shipped set name (``imagenet1k``, ``pets``, ...) or a file with one name per line."""
    text = str(spec)
    sets = _asset_json("en_classnames.json")
    if text in sets:
        return list(sets[text])
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"class names {text!r}: no such file and not a shipped set "
                                f"({', '.join(classname_set_names())})")
    return check_classnames(_read_lines(path), f"class file {path}")


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def eval_mode(model):
    """Run a block with ``model`` in eval mode (BatchNorm statistics frozen), restoring its mode after."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield model
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)


def _weights_version(model) -> int:
    """Changes whenever a parameter is modified in place (optimizer steps, load_state_dict) or replaced:
    torch bumps a tensor's ``_version`` counter on every in-place write, and a new tensor has a new address."""
    if not hasattr(model, "parameters"):
        return 0
    return hash(tuple((p.data_ptr(), p._version) for p in model.parameters()))


@torch.no_grad()
def _encode_prompts(model, classnames: list[str], templates: list[str], tokenizer, batch_size: int) -> torch.Tensor:
    prompts = [fill_template(t, c) for c in classnames for t in templates]  # class-major order
    device = model_device(model)
    with eval_mode(model):
        chunks = [F.normalize(model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float(), dim=-1)
                  for i in range(0, len(prompts), batch_size)]
    per_prompt = torch.cat(chunks).reshape(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).t().contiguous()  # (D, C)


def build_zeroshot_classifier(model, classnames: Sequence[str], templates: str | Sequence[str] | None = None,
                              tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """Zero-shot weights (embed_dim, num_classes) for ``image_features @ weights``, on the model's device.

    Column ``c`` is ``normalize(mean_t normalize(encode_text(template_t filled with class c))))``. Prompts
    are encoded in batches of ``batch_size``. The result is cached (LRU) per model object, weights version
    (any in-place parameter change invalidates it), class names and templates. Repeated names are allowed
    here (OpenAI's ImageNet list names two classes 'missile'); :class:`ZeroShotClassifier` rejects them.
    """
    classnames = check_classnames(classnames, unique=False)
    templates = load_templates(templates)
    tokenizer_key = id(tokenizer) if tokenizer is not None else int(getattr(model, "context_length", 77))
    key = (id(model), _weights_version(model), tuple(classnames), tuple(templates), tokenizer_key)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is model:
        _cache.move_to_end(key)
        return hit[1]
    tokenizer = tokenizer or get_tokenizer(tokenizer_key)
    weights = _encode_prompts(model, classnames, templates, tokenizer, batch_size)
    _cache[key] = (weakref.ref(model), weights)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return weights


class ZeroShotClassifier:
    """A zero-shot image classifier over fixed class names: probabilities, top-k labels, multi-label scores.

    ``probabilities`` is ``softmax(exp(logit_scale) * normalize(image_features) @ weights)`` over the classes.
    ``multilabel_scores`` scores each class on its own: the two-way softmax between the class prompt and a
    neutral prompt (``negative``, default "thing", through the same templates), i.e.
    ``sigmoid(exp(logit_scale) * (cos(image, class) - cos(image, neutral)))``: above 0.5 when the image is
    closer to the class than to a generic object, independently of the other classes.

    Repeated class names raise ValueError unless ``allow_duplicates`` (OpenAI's ImageNet list has two).
    """

    def __init__(self, model, classnames: Sequence[str], templates: str | Sequence[str] | None = None,
                 tokenizer=None, negative: str = "thing", batch_size: int = 256, allow_duplicates: bool = False):
        self.model = model
        self.classnames = check_classnames(classnames, unique=not allow_duplicates)
        self.templates = load_templates(templates)
        self.negative = check_classnames([negative], "negative label")[0]
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def weights(self) -> torch.Tensor:
        """The (embed_dim, num_classes) classifier, rebuilt only when the model's weights changed."""
        return build_zeroshot_classifier(self.model, self.classnames, self.templates, self.tokenizer,
                                         self.batch_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned temperature exp(logit_scale) (about 100 for OpenAI's models)."""
        return self.model.logit_scale.detach().float().exp()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> L2-normalised float features (N, embed_dim)."""
        with eval_mode(self.model):
            features = self.model.encode_image(images.to(model_device(self.model)))
        return F.normalize(features.float(), dim=-1)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled cosine similarities (N, num_classes) of image features with every class."""
        features = F.normalize(image_features.float(), dim=-1)
        return self.logit_scale * features @ self.weights.to(features.device)

    def probabilities(self, image_features: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes (N, num_classes); each row sums to 1."""
        return self.logits(image_features).softmax(dim=-1)

    def multilabel_scores(self, image_features: torch.Tensor) -> torch.Tensor:
        """Per-class independent scores in (0, 1), (N, num_classes); rows need not sum to 1."""
        features = F.normalize(image_features.float(), dim=-1)
        neutral = build_zeroshot_classifier(self.model, [self.negative], self.templates, self.tokenizer)
        cos_class = features @ self.weights.to(features.device)  # (N, C)
        cos_neutral = features @ neutral.to(features.device)  # (N, 1)
        return torch.sigmoid(self.logit_scale * (cos_class - cos_neutral))

    def predict(self, images: torch.Tensor, top_k: int = 5,
                multi_label: bool = False) -> list[list[tuple[str, float]]]:
        """For each preprocessed image, its ``top_k`` (label, score) pairs, best first."""
        features = self.encode_images(images)
        scores = self.multilabel_scores(features) if multi_label else self.probabilities(features)
        values, indices = scores.topk(min(top_k, len(self.classnames)), dim=-1)
        return [[(self.classnames[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]
