"""The one evaluator interface (as big_vision's): ``SomeEvaluator(data=..., ...).run(model, preprocess) -> metrics``.

Metrics are named fractions in [0, 1]; everything else a run learns (image counts, skipped files, the chosen
regularisation) goes to ``details``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

from .datasets import EncodedImages, ImageRef, encode_images

MAX_LISTED_SKIPS = 20


@dataclass(kw_only=True)
class Evaluator:
    """Base of all evaluators: batching options, and ``details`` filled by :meth:`run`."""

    batch_size: int = 64
    workers: int = 0
    details: dict = field(default_factory=dict, init=False, repr=False)

    def run(self, model, preprocess: Callable) -> dict[str, float]:
        """Evaluate ``model`` (images through ``preprocess``) and return named metrics."""
        raise NotImplementedError

    def encode(self, model, preprocess: Callable, refs: list[ImageRef], where: str,
                normalize: bool = True) -> EncodedImages:
        """Image features of ``refs``; unreadable images are skipped, counted in ``details`` and warned about."""
        encoded = encode_images(model, preprocess, refs, self.batch_size, self.workers, normalize)
        listed = self.details.setdefault("skipped_images", [])
        listed.extend(encoded.skipped[:max(0, MAX_LISTED_SKIPS - len(listed))])
        self.details["num_skipped_images"] = self.details.get("num_skipped_images", 0) + len(encoded.skipped)
        if encoded.skipped:
            warnings.warn(f"{where}: skipped {len(encoded.skipped)} of {len(refs)} images that could not be read "
                          f"(first: {encoded.skipped[0]})", stacklevel=2)
        return encoded
