"""Batched, L2-normalised encoding of images and texts with a CLIP model, the one loop shared by zero-shot
classification, validation, evaluation and explanations: eval mode, no gradients, the model's device.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterable, Sequence

import torch
import torch.nn.functional as F

from clipforge.tokenizer import DEFAULT_CONTEXT_LENGTH, model_tokenizer


class NothingToEncode(ValueError):
    """An encode call that was given no inputs (an empty tensor or an iterable of no batches)."""


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def eval_mode(model):
    """Run a block with ``model`` in eval mode (BatchNorm statistics frozen), restoring each module's mode
    after. A model already in eval mode is left untouched: switching modes walks every module twice, a cost
    that rivals encoding one short text query."""
    training = [m for m in model.modules() if m.training] if isinstance(model, torch.nn.Module) else []
    if training:
        model.eval()
    try:
        yield model
    finally:
        for module in training:
            module.training = True


def context_length(model) -> int:
    """The model's text context length in tokens; 77 for models that do not say."""
    return int(getattr(model, "context_length", DEFAULT_CONTEXT_LENGTH))


@torch.no_grad()
def _encode(model, encode: Callable, batches: Iterable[torch.Tensor], autocast: Callable[[], ContextManager],
            normalize: bool) -> torch.Tensor:
    device = model_device(model)
    chunks = []
    with eval_mode(model):
        for batch in batches:
            with autocast():
                chunks.append(encode(batch.to(device)).float())
    if not chunks:
        raise NothingToEncode("nothing to encode: no inputs were given")
    features = torch.cat(chunks)  # (N, D)
    return F.normalize(features, dim=-1) if normalize else features


def encode_images(model, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256,
                  autocast: Callable[[], ContextManager] = nullcontext, normalize: bool = True) -> torch.Tensor:
    """Float32 image features (N, D), L2-normalised unless ``normalize=False``, on the model's device.

    ``images`` is a preprocessed tensor (N, 3, H, W), encoded ``batch_size`` at a time, or any iterable of
    such batches (``batch_size`` is then unused), encoded in order. ``autocast`` makes the context each
    batch is encoded in (e.g. ``functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)``).

    To encode a DataLoader whose items carry more than images, yield the images from a generator and keep
    the rest on the side; the generator runs inside this call, batch by batch::

        kept = []
        def batches():
            for index, images in loader:
                kept.append(index)
                yield images
        features = encode_images(model, batches())  # row i of features is image torch.cat(kept)[i]
    """
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    return _encode(model, model.encode_image, batches, autocast, normalize)


def encode_texts(model, texts: Sequence[str] | torch.Tensor, tokenizer: Callable | None = None,
                 batch_size: int = 256, autocast: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
    """L2-normalised float32 text features (N, D) on the model's device, in the order of ``texts``.

    ``texts`` are strings, tokenized ``batch_size`` at a time with ``tokenizer`` (default: the model's
    own, ``clipforge.tokenizer.model_tokenizer``, which truncates long texts), or already tokenized ids (N, L).
    """
    if isinstance(texts, torch.Tensor):
        batches = texts.split(batch_size)
    else:
        if tokenizer is None:
            tokenizer = model_tokenizer(model)
        batches = (tokenizer(list(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size))
    return _encode(model, model.encode_text, batches, autocast, normalize=True)


def encode_captions(model, captions: Sequence[str | None], dim: int) -> torch.Tensor:
    """``encode_texts`` of the captions there are, as float32 rows (N, ``dim``) on the CPU in the order of
    ``captions``, with a row of zeros where one is None or empty (an image without a caption)."""
    out = torch.zeros(len(captions), dim)
    present = [i for i, caption in enumerate(captions) if caption]
    if present:
        out[present] = encode_texts(model, [captions[i] for i in present]).float().cpu()
    return out
