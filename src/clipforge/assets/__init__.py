"""Data files shipped with clipforge (BPE merges, class names, prompt templates; sources in NOTICE.md)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def read_json(name: str):
    """A shipped JSON file, parsed once per process."""
    return json.loads((resources.files(__name__) / name).read_text(encoding="utf-8"))
