"""The one evaluator interface (as big_vision's): ``SomeEvaluator(data=..., ...).run(model, preprocess) -> metrics``.

Metrics are named fractions in [0, 1]; everything else a run learns (image counts, skipped files, the chosen
regularisation) goes to ``details``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from clipforge.data.images import ImageFiles, ImageRef, collate_images
from clipforge.encode import NothingToEncode, encode_images

MAX_LISTED_SKIPS = 20


@dataclass
class EncodedImages:
    """Image features of the readable images; ``kept`` indexes them into the input list."""

    features: torch.Tensor
    kept: torch.Tensor
    skipped: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Evaluator:
    """Base of all evaluators: batching options, and ``details`` filled by ``run``."""

    batch_size: int = 64
    workers: int = 0
    details: dict = field(default_factory=dict, init=False, repr=False)

    def run(self, model, preprocess: Callable) -> dict[str, float]:
        """Evaluate ``model`` (images through ``preprocess``) and return named metrics."""
        raise NotImplementedError

    def encode(self, model, preprocess: Callable, refs: list[ImageRef], where: str,
               normalize: bool = True) -> EncodedImages:
        """Image features of ``refs`` (DataLoader workers decode and preprocess); unreadable images are
        skipped, counted in ``details`` and warned about."""
        loader = torch.utils.data.DataLoader(ImageFiles(refs, preprocess), batch_size=self.batch_size,
                                             num_workers=self.workers, collate_fn=collate_images)
        kept, skipped = [], []

        def readable_batches():
            for index, images, errors in loader:
                skipped.extend(errors)
                if images is not None:
                    kept.append(index)
                    yield images

        try:
            features = encode_images(model, readable_batches(), normalize=normalize)
        except NothingToEncode:
            raise ValueError(f"none of the {len(refs)} images could be read; first error: "
                             f"{skipped[0] if skipped else '-'}") from None
        listed = self.details.setdefault("skipped_images", [])
        listed.extend(skipped[:max(0, MAX_LISTED_SKIPS - len(listed))])
        self.details["num_skipped_images"] = self.details.get("num_skipped_images", 0) + len(skipped)
        if skipped:
            warnings.warn(f"{where}: skipped {len(skipped)} of {len(refs)} images that could not be read "
                          f"(first: {skipped[0]})", stacklevel=2)
        return EncodedImages(features, torch.cat(kept), skipped)
