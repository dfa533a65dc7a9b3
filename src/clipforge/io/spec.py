"""The one rule for naming a model: what ``clipforge.load``'s first argument and every command's ``--model`` mean,
decided before anything is downloaded or read.

A spec is, in this order:

- an existing file or folder: a checkpoint file, a saved model folder, a training run directory (its newest
  complete checkpoint), or ``RUN@best`` (the run's best checkpoint, kept by ``--keep-best``); a path wins
  over a name, so a path may contain ':';
- ``ARCH:WEIGHTS`` in one string, or ``ARCH`` with ``pretrained=WEIGHTS`` (``--pretrained``): the registered
  architecture ``ARCH`` with OpenCLIP's pretrained tag ``WEIGHTS`` (``ViT-H-14:laion2b_s32b_b79k``; see
  ``clipforge.list_pretrained()``), or with the weights of another spec (a checkpoint, a run, an OpenAI name);
- a name with default weights: OpenAI's (``ViT-B/32``, ``RN50``; also the registry's ``ViT-B-32``);
- an architecture without weights (``ViT-H-14``, ``tiny-vit``, a model-config JSON file) only with
  ``random_init=True`` (``--random-init``): seed-0 random weights, for tests and demos. Without it the spec is
  refused (``NoWeightsError``), so that nothing is ever encoded with weights nobody asked for.

``random_init`` on a name with weights is asked for explicitly, so it wins: that architecture with seed-0 random
weights. With a tag or a checkpoint beside it, it is a contradiction, refused (ValueError). Loading puts
downloaded weights into the architecture they were trained with (``ViT-B-32:openai`` is QuickGELU, as OpenAI
trained it); ``create_model`` builds the name's own, with OpenCLIP's warning when the two differ.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from clipforge.io.pretrained import PRETRAINED, PretrainedWeights, pretrained_tags, pretrained_weights
from clipforge.io.runs import BEST_SUFFIX, checkpoint_path
from clipforge.models.registry import canonical_name, list_models

__all__ = ["ModelSpec", "NoWeightsError", "UnknownModelError", "no_weights_message", "resolve_spec", "resolve_weights",
           "spec_and_weights", "split_spec"]

RANDOM_INIT_HOW = ("for seed-0 random weights (tests and demos) pass --random-init on the command line, "
                   "random_init=True in Python")


class NoWeightsError(ValueError):
    """An architecture named without weights; the message lists its downloadable tags and how to ask for
    random weights."""


class UnknownModelError(FileNotFoundError, ValueError):
    """A spec that is neither an existing file or folder nor a registered model name; the message lists close
    matches. Both a FileNotFoundError (as a missing path) and a ValueError (as an unknown name)."""


@dataclass(frozen=True)
class ModelSpec:
    """What a model spec names. The weights come from exactly one of: ``weights`` (a download), ``path`` (a
    checkpoint file or folder, a run directory) or ``random_init`` (seed-0 random weights).

    ``text`` is the spec in one string, as an index's config.json records it (with ``random_init`` beside it);
    resolving it again gives the same spec. ``architecture`` is the registry name or model-config JSON the model
    is built as; None: the checkpoint's own config (or, for a download, the one the weights were trained with).
    """

    text: str
    architecture: str | None = None
    tag: str | None = None
    weights: PretrainedWeights | None = None
    path: Path | None = None
    random_init: bool = False

    def __str__(self) -> str:
        return self.text


def resolve_spec(spec: str | Path | ModelSpec, pretrained: str | Path | None = None,
                 random_init: bool = False) -> ModelSpec:
    """The ``ModelSpec`` that ``spec`` (with ``pretrained`` weights, or ``random_init``) names; reads no
    weights. Raises ``NoWeightsError`` for an architecture without weights and without ``random_init``,
    ``UnknownModelError`` for a name that is not registered, FileNotFoundError for a missing path and
    ValueError for weights that do not fit the spec (a tag the architecture lacks, two kinds of weights)."""
    if isinstance(spec, ModelSpec):
        if pretrained is None and random_init in (False, spec.random_init):
            return spec
        spec = spec.text
    if pretrained is not None and random_init:
        raise ValueError(f"pretrained={str(pretrained)!r} and random_init ask for two different weights: give "
                         f"one (--pretrained TAG for published weights, --random-init for seed-0 random weights)")
    text = str(spec)
    path = _existing_path(text)
    if path is not None:
        return _from_path(text, path, pretrained, random_init)
    name, weights = spec_and_weights(text, pretrained)
    if random_init and weights is not None:
        raise ValueError(f"{text!r} names weights ({weights!r}) and random_init asks for random ones: give one")
    if weights is not None and name.endswith(".json") and Path(name).is_file():  # "ARCH.json:WEIGHTS"
        return resolve_weights(str(Path(name).resolve()), weights)
    arch = _registered(name, text)
    if random_init:
        return ModelSpec(name, arch, random_init=True)
    if weights is not None:
        return resolve_weights(name, weights)
    found = pretrained_weights(name)
    if found is None:
        raise NoWeightsError(no_weights_message(name))
    return ModelSpec(name, None, weights=found)


def resolve_weights(architecture: str | None, pretrained: str | Path) -> ModelSpec:
    """The weights ``pretrained`` names for the architecture ``architecture`` (a registered name, a model-config
    JSON file, or None for a config given as data): one of its OpenCLIP tags (or 'openai'), a checkpoint file
    or folder, a run directory, ``RUN@best``, or any spec with weights (``ViT-B/32``,
    ``ViT-B-32:laion2b_s34b_b79k``), loaded into ``architecture``. What ``create_model(name, pretrained=...)``
    and ``train --pretrained`` take; an existing path wins over a tag of the same name."""
    tag, arch = str(pretrained), None if architecture is None else str(architecture)
    is_name = arch is not None and canonical_name(arch) is not None
    prefix = f"{arch}:" if arch is not None else ""
    path = _existing_path(tag)
    if path is None and isinstance(pretrained, Path):
        raise FileNotFoundError(f"checkpoint {pretrained} does not exist")
    if path is not None:
        return ModelSpec(prefix + _path_text(tag, path), arch, path=path)
    found = pretrained_weights(arch, tag) if is_name else None
    if found is not None:
        return ModelSpec(f"{arch}:{tag}", arch, tag=tag, weights=found)
    if tag == "openai":
        raise ValueError(f"pretrained='openai' needs a model name with published weights "
                         f"({', '.join(PRETRAINED)}), got {arch!r}")
    other = _weights_spec(tag)
    if other is None:
        tags = pretrained_tags(arch) if is_name else []
        raise FileNotFoundError(f"pretrained={tag!r} is neither an existing checkpoint path nor a pretrained tag of "
                                f"{arch!r} (its tags: {', '.join(tags) or 'none'}; all pairs: "
                                f"clipforge.list_pretrained()) nor a model with weights (ViT-B/32, RN50, ...)")
    return ModelSpec(prefix + other.text, arch, other.tag, other.weights, other.path)


def spec_and_weights(text: str, pretrained: str | Path | None) -> tuple[str, str | Path | None]:
    """(name, weights) for a spec string and a separate ``pretrained``: the weights ``ARCH:WEIGHTS`` carries,
    else ``pretrained``. ValueError when both name weights and they differ."""
    name, weights = split_spec(text)
    if weights is None:
        return name, pretrained
    if pretrained is not None and str(pretrained) != weights:
        raise ValueError(f"{text!r} names its weights ({weights!r}) and pretrained={str(pretrained)!r} others: "
                         f"give them once")
    return name, weights


def split_spec(text: str) -> tuple[str, str | None]:
    """``("ViT-H-14", "laion2b_s32b_b79k")`` for ``"ViT-H-14:laion2b_s32b_b79k"``: a registered name (or a
    model-config JSON file), then its weights after the ':'; ``(text, None)`` when no such name comes first."""
    name, colon, weights = text.partition(":")
    if colon and weights and canonical_name(name) is not None:
        return name, weights
    config_end = text.find(".json:") + len(".json")  # "/abs/arch.json:/abs/run": the recorded form of such a pair
    if config_end > len(".json") - 1 and Path(text[:config_end]).is_file() and text[config_end + 1:]:
        return text[:config_end], text[config_end + 1:]
    return text, None


def no_weights_message(name: str) -> str:
    """Why ``name`` is refused without weights: its tags and how to ask for random weights."""
    tags = pretrained_tags(name)
    shown = ", ".join(tags) if tags else "none"
    example = (f"; ask for one as --model {name}:{tags[0]} or --model {name} --pretrained {tags[0]} "
               f"(Python: pretrained={tags[0]!r})" if tags else "")
    return (f"{name!r} is an architecture without default weights, and nothing is encoded with random weights "
            f"unasked. Its downloadable pretrained tags: {shown}{example}; or give a checkpoint, saved model or "
            f"run directory. {RANDOM_INIT_HOW[0].upper()}{RANDOM_INIT_HOW[1:]}")


def _existing_path(text: str) -> Path | None:
    """The path ``text`` names if it exists (``RUN@best`` when RUN is a run directory), else None."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.endswith(BEST_SUFFIX):  # no model name ends so: RUN@best, or FileNotFoundError saying it has no best
        return checkpoint_path(text)
    return None


def _path_text(text: str, path: Path) -> str:
    """How a path is recorded: absolute, with ``@best`` kept (a run's best, which may change)."""
    if text.endswith(BEST_SUFFIX) and not Path(text).expanduser().exists():
        return str(Path(text[: -len(BEST_SUFFIX)]).expanduser().resolve()) + BEST_SUFFIX
    return str(path.resolve())


def _from_path(text: str, path: Path, pretrained: str | Path | None, random_init: bool) -> ModelSpec:
    if path.suffix == ".json" and path.is_file():  # a model config: an architecture, not weights
        arch = str(path.resolve())
        if random_init:
            return ModelSpec(arch, arch, random_init=True)
        if pretrained is not None:
            return resolve_weights(arch, pretrained)
        raise NoWeightsError(f"{text} is an architecture config without weights. Give weights with --pretrained "
                             f"(a checkpoint, a run directory) or a checkpoint instead; {RANDOM_INIT_HOW}")
    if pretrained is not None or random_init:
        asked = f"pretrained={str(pretrained)!r}" if pretrained is not None else "random_init"
        raise ValueError(f"{text} is a checkpoint with its own weights and {asked} asks for others: give a model "
                         f"name (or a model-config JSON) with them, or the checkpoint alone")
    return ModelSpec(_path_text(text, path), path=path)


def _registered(name: str, text: str) -> str:
    arch = canonical_name(name)
    if arch is not None:
        return arch
    if "/" in text or "\\" in text or Path(text).suffix:
        raise UnknownModelError(f"{text!r} is neither an existing file or folder nor a model name with "
                                f"weights ({', '.join(PRETRAINED)}){_close_matches(name)}")
    raise UnknownModelError(f"{text!r} is neither an existing file or folder nor a model name: OpenAI's "
                            f"({', '.join(PRETRAINED)}) or a registered architecture{_close_matches(name)}; "
                            f"clipforge.list_models() lists them all")


def _close_matches(name: str) -> str:
    names = {known.lower(): known for known in [*PRETRAINED, *list_models()]}
    close = [names[k] for k in difflib.get_close_matches(name.lower(), list(names), n=4, cutoff=0.6)]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _weights_spec(text: str) -> ModelSpec | None:
    """The spec ``text`` names when it has weights (not random ones), else None."""
    try:
        found = resolve_spec(text)
    except (ValueError, FileNotFoundError):
        return None
    return found if not found.random_init else None
