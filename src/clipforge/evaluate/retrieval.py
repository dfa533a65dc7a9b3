"""Zero-shot image-text retrieval (CLIP paper Table 13, COCO / Flickr30k): recall@1/5/10 in both directions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from clipforge.data.captions import read_captions
from clipforge.encode import encode_texts
from clipforge.evaluate.base import Evaluator
from clipforge.evaluate.metrics import retrieval_metrics


@dataclass(kw_only=True)
class RetrievalEvaluator(Evaluator):
    """``image_to_text_recall@K`` and ``text_to_image_recall@K`` (K = 1, 5, 10) on a caption set.

    ``data``: a Karpathy-split JSON (images under ``image_root``, default the JSON's folder; only ``split``)
    or a CSV with ``filepath`` and ``caption`` columns. Captions of unreadable images are dropped with them.
    """

    data: str
    split: str = "test"
    image_root: str | None = None
    ks: tuple[int, ...] = (1, 5, 10)

    def run(self, model, preprocess: Callable) -> dict[str, float]:
        data = read_captions(self.data, self.split, self.image_root)
        encoded = self.encode(model, preprocess, data.images, data.source)
        new_index = torch.full((len(data.images),), -1, dtype=torch.long)
        new_index[encoded.kept] = torch.arange(len(encoded.kept))  # old image index -> row in the features
        owner = new_index[torch.tensor(data.image_of_caption, dtype=torch.long)]
        keep = (owner >= 0).nonzero().flatten().tolist()
        texts = encode_texts(model, [data.captions[j] for j in keep], batch_size=self.batch_size)
        similarity = encoded.features @ texts.to(encoded.features.device).t()  # (N_images, N_texts)
        self.details.update(num_images=len(encoded.kept), num_captions=len(keep))
        return retrieval_metrics(similarity, owner[keep], self.ks)
