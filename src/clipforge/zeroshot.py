"""Zero-shot classification (Radford et al. 2021, sec. 3.1.4): class names + prompt templates -> a linear classifier.

Each class embedding is the renormalised mean of its L2-normalised prompt embeddings (prompt ensembling);
templates use ``{}`` or ``{c}`` for the class name, as in OpenAI's notebook and CLIP_benchmark's JSON.
Models of the predictive objectives (sec. 2.3) score each prompt instead: summed word log-probabilities
(bag of words) or the prompt's log-likelihood (caption); a classify model reads its own head (``objectives.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clipforge.assets import read_json
from clipforge.data.classnames import check_classnames, read_text_lines
from clipforge.encode import encode_images, encode_texts
from clipforge.objectives import image_only, model_objective
from clipforge.tokenizer import model_tokenizer

DEFAULT_TEMPLATES = ("a photo of a {}.",)
PLACEHOLDERS = ("{c}", "{}")
TEMPLATE_ALIASES = {"openai": "imagenet1k"}
TEMPLATES_ASSET = "en_zeroshot_classification_templates.json"


def template_set_names() -> list[str]:
    """Names accepted by ``load_templates``: CLIP_benchmark's per-dataset sets plus 'openai' and 'default'."""
    return sorted({*read_json(TEMPLATES_ASSET), *TEMPLATE_ALIASES, "default"})


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


def fill_template(template: str, classname: str) -> str:
    """The prompt for one class: every ``{c}`` and ``{}`` replaced by ``classname``."""
    for placeholder in PLACEHOLDERS:
        template = template.replace(placeholder, classname)
    return template


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
    sets = read_json(TEMPLATES_ASSET)
    name = TEMPLATE_ALIASES.get(text, text)
    if name in sets:
        return check_templates(sets[name], f"template set {text!r}")
    if Path(text).is_file():
        lines = [line.strip() for line in read_text_lines(text, "template file")]
        return check_templates(lines, f"template file {text}")
    if any(p in text for p in PLACEHOLDERS):
        return [text]
    raise ValueError(f"templates {text!r}: not a template set, not a file and no '{{}}' placeholder. "
                     f"Sets: {', '.join(template_set_names())}")


def build_zeroshot_classifier(model, classnames: Sequence[str], templates: str | Sequence[str] | None = None,
                              tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """Zero-shot weights (embed_dim, num_classes) for ``image_features @ weights``, on the model's device.

    Column ``c`` is ``normalize(mean_t normalize(encode_text(template_t filled with class c))))``. Prompts
    are encoded in batches of ``batch_size``. Repeated names are allowed here (OpenAI's ImageNet list names
    two classes 'missile'); ``ZeroShotClassifier`` rejects them.
    """
    classnames = check_classnames(classnames, unique=False)
    templates = load_templates(templates)
    prompts = _prompts(classnames, templates)
    per_prompt = encode_texts(model, prompts, tokenizer, batch_size).reshape(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).t().contiguous()  # (C, T, D) -> (D, C)


def _prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    return [fill_template(t, c) for c in classnames for t in templates]  # class-major order


class _ScoresAsFeatures(torch.nn.Module):
    """A classifier seen as an image encoder whose features are its class scores, so the one batched loop
    (``clipforge.encode.encode_images``, ``Evaluator.encode``) runs it; eval mode and device are the model's."""

    def __init__(self, classifier: "ZeroShotClassifier"):
        super().__init__()
        self.model = classifier.model
        self._score_batch = classifier._score_batch

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._score_batch(images)


def zeroshot_scores(model, images: torch.Tensor, classnames: Sequence[str],
                    templates: str | Sequence[str] | None = None, tokenizer=None, batch_size: int = 256) -> torch.Tensor:
    """Class scores (N, C) of preprocessed images for a model of any objective; see ``ZeroShotClassifier.scores``."""
    return ZeroShotClassifier(model, classnames, templates, tokenizer, batch_size=batch_size,
                              allow_duplicates=True).scores(images)


class ZeroShotClassifier:
    """A zero-shot image classifier over fixed class names: probabilities, top-k labels, multi-label scores.

    ``probabilities`` is ``softmax(exp(logit_scale) * normalize(image_features) @ weights)`` over the classes.
    ``multilabel_scores`` scores each class on its own: the two-way softmax between the class prompt and a
    neutral prompt (``negative``, default "thing", through the same templates), i.e.
    ``sigmoid(exp(logit_scale) * (cos(image, class) - cos(image, neutral)))``: above 0.5 when the image is
    closer to the class than to a generic object, independently of the other classes.

    ``weights`` (embed_dim, num_classes) and ``neutral_weights`` (embed_dim, 1) are computed when the
    classifier is built and kept: after the model's weights change (inside a training loop, after
    ``load_state_dict``), call ``refresh``. Prompts and images are encoded ``batch_size`` at a time.
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
        self.refresh()

    def refresh(self) -> None:
        """Recompute ``weights`` and ``neutral_weights`` (contrastive models; None for the others, which
        prepare their prompt scorer instead) from the model's current parameters."""
        self.objective = model_objective(self.model)
        if self.objective != "contrastive":
            self.weights = self.neutral_weights = None
            tokenizer = self.tokenizer or model_tokenizer(self.model)
            prompts = _prompts(self.classnames, self.templates)
            self._score_batch = image_only(self.objective).scorer(self.model, self.classnames, prompts, tokenizer)
            return
        self._score_batch = lambda images: self.logits(self.model.encode_image(images))
        self.weights = build_zeroshot_classifier(self.model, self.classnames, self.templates, self.tokenizer,
                                                 self.batch_size)
        self.neutral_weights = build_zeroshot_classifier(self.model, [self.negative], self.templates,
                                                         self.tokenizer, self.batch_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's learned temperature exp(logit_scale) (about 100 for OpenAI's models)."""
        return self.model.logit_scale.detach().float().exp()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> L2-normalised float features (N, embed_dim)."""
        return encode_images(self.model, images, self.batch_size)

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
        cos_class = features @ self.weights.to(features.device)  # (N, C)
        cos_neutral = features @ self.neutral_weights.to(features.device)  # (N, 1)
        return torch.sigmoid(self.logit_scale * (cos_class - cos_neutral))

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (N, num_classes) of preprocessed images (N, 3, H, W), higher = more likely, encoded
        ``batch_size`` at a time: contrastive, ``logits``; bow, the mean over templates of the prompt's
        summed word log-probabilities; caption, the mean over templates of the prompt's log-likelihood;
        classify, the model's class logits of these class names (templates unused)."""
        if self.objective == "contrastive":
            return self.logits(self.encode_images(images))
        return encode_images(self.as_encoder(), images, self.batch_size, normalize=False)

    def as_encoder(self) -> torch.nn.Module:
        """A module whose ``encode_image(batch)`` is this classifier's scores of the batch, for batched
        image loops (``Evaluator.encode(..., normalize=False)``)."""
        return _ScoresAsFeatures(self)

    def predict(self, images: torch.Tensor, top_k: int = 5,
                multi_label: bool = False) -> list[list[tuple[str, float]]]:
        """For each preprocessed image, its ``top_k`` (label, score) pairs, best first: softmax of
        ``scores``, or with ``multi_label`` (contrastive models) ``multilabel_scores``."""
        if multi_label and self.objective != "contrastive":
            raise ValueError(f"multi-label scores compare each class with a neutral prompt in CLIP's joint "
                             f"space; a {self.objective!r} model has none: use multi_label=False")
        scores = self.multilabel_scores(self.encode_images(images)) if multi_label else self.scores(images).softmax(-1)
        values, indices = scores.topk(min(top_k, len(self.classnames)), dim=-1)
        return [[(self.classnames[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]
