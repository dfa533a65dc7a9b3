"""Tags: every stored image vector scored against a label set with the zero-shot classifier of the index's own
model (prompt ensembles as ``clipforge classify --multi-label``: each label against a neutral prompt), the best
labels above a threshold kept per item in the store, nothing encoded again but the labels' prompts. A search
filters by them (``tag:dog``) and the page shows them."""
from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import torch

from clipforge.data.classnames import check_classnames, load_classnames
from clipforge.search.stores import build_target
from clipforge.zeroshot import ZeroShotClassifier, load_templates

TAG_THRESHOLD = 0.5  # a label's score against the neutral prompt: above 0.5, closer to the label than to "thing"
TAG_TOP = 5          # labels kept per item at most
CHUNK = 4096


def tag_items(index, address, model, labels, templates=None, threshold: float = TAG_THRESHOLD, top: int = TAG_TOP,
              only_untagged: bool = False) -> dict:
    """Score ``index``'s image vectors (``address``: where it lives, to write) against ``labels`` and store each
    item's best ``top`` labels scoring at least ``threshold``. ``only_untagged``: tag just the items without
    tags, when the label set, templates, threshold and top are those recorded (after an update); else all."""
    if not 0 < threshold < 1 or top < 1:
        raise ValueError(f"the tag threshold is a score between 0 and 1 and top at least 1, got {threshold} and {top}")
    names = load_classnames(labels) if isinstance(labels, str) else check_classnames(list(labels), unique=False)
    templates = load_templates(templates)
    classifier = ZeroShotClassifier(model, names, templates, allow_duplicates=True)
    if classifier.objective != "contrastive":
        raise ValueError(f"tags compare image vectors with label prompts in CLIP's joint space; this index's "
                         f"{classifier.objective!r} model has none")
    info = {"labels": labels if isinstance(labels, str) else list(names), "count": len(names),
            "templates": templates, "threshold": threshold, "top": top,
            "labels_sha256": hashlib.sha256(json.dumps([names, templates]).encode()).hexdigest()}
    ids = index.ids()
    same = index.config.get("tags") == info
    if only_untagged and same:
        tagged = set()
        for start in range(0, len(ids), CHUNK):
            tagged |= set(index.store.tags_of([int(i) for i in ids[start:start + CHUNK]]))
        ids = np.array([i for i in ids.tolist() if i not in tagged], dtype=np.int64)
    rows, counts = [], Counter()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        with torch.no_grad():
            scores = classifier.multilabel_scores(torch.from_numpy(index.vectors(chunk)))
        values, columns = scores.topk(min(top, len(names)), dim=-1)
        for id, row_values, row_columns in zip(chunk.tolist(), values.tolist(), columns.tolist()):
            best: dict[str, float] = {}
            for value, column in zip(row_values, row_columns):
                if value >= threshold and value > best.get(names[column], -1.0):  # a name listed twice: its best
                    best[names[column]] = value
            rows += [(id, label, round(score, 6)) for label, score in best.items()]
            counts.update(best)
    target = build_target(address)
    try:
        target.store_tags(info, rows, [int(i) for i in ids] if only_untagged and same else None)
    finally:
        target.close()
    return {"scored": int(len(ids)), "tagged": len({r[0] for r in rows}), "tags": len(rows),
            "labels": len(names), "most_common": counts.most_common(10)}
