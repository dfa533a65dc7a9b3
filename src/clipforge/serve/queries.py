"""The body of ``POST /api/search`` (a query string, weighted terms, paging and filters), its pagination
cursor, and the bounded store of uploaded query images that lets a page refer to an upload again."""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections import OrderedDict

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOP_K = 200


class Term(BaseModel):
    """One weighted part of a query: exactly one of ``text``, ``image`` (base64 of an encoded image),
    ``upload`` (the ``upload`` key a previous search returned) or ``id`` (an indexed item)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=1000)
    image: str | None = None
    upload: str | None = Field(None, pattern="^[0-9a-f]{64}$")
    id: int | None = Field(None, ge=0)
    weight: float = Field(1.0, ge=-100, le=100)

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("text", "image", "upload", "id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a term has exactly one of text, image, upload or id; got {given or 'none'}")
        return self


class SearchRequest(BaseModel):
    """What to search for and which results to return; ``query`` uses the command line's syntax
    (``"beach + 0.5:sunset - people"``, ``id:42``) except image paths, and adds to ``terms``."""

    model_config = ConfigDict(extra="forbid")
    query: str | None = Field(None, max_length=2000)
    terms: list[Term] = Field(default_factory=list, max_length=16)
    top_k: int = Field(20, ge=1, le=MAX_TOP_K)
    cursor: str | None = Field(None, max_length=200)
    folder: str | None = Field(None, max_length=1000)
    min_score: float | None = Field(None, ge=-1, le=1)
    dedup: float | None = Field(None, gt=0, le=1)
    captions: bool = False
    after: str | None = Field(None, max_length=32, description="captured at or after: YYYY-MM-DD[THH:MM[:SS]]")
    before: str | None = Field(None, max_length=32, description="captured before: YYYY-MM-DD[THH:MM[:SS]]")
    caption_contains: str | None = Field(None, min_length=1, max_length=1000)
    sort: str = Field("score", pattern="^(score|date)$", description="score (best first) or date (newest first)")
    tags: list[str] = Field(default_factory=list, max_length=16, description="only items with every one of these tags")


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The result offset a cursor stands for (0 for none); ValueError for one this service did not make."""
    if not cursor:
        return 0
    try:
        offset = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["offset"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        offset = None
    if not isinstance(offset, int) or offset < 0:
        raise ValueError("invalid cursor: pass back the next_cursor of a previous response unchanged")
    return offset


def decode_image_term(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a term's image is not valid base64 (send the encoded file's bytes in base64)") from None


class Uploads:
    """The most recent uploaded query images, by SHA-256, holding at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self._held, self._size = max_bytes, OrderedDict(), 0
        self._lock = threading.Lock()

    def add(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            if key not in self._held:
                self._held[key] = data
                self._size += len(data)
            self._held.move_to_end(key)
            while self._size > self.max_bytes and len(self._held) > 1:
                self._size -= len(self._held.popitem(last=False)[1])
        return key

    def get(self, key: str) -> bytes:
        """The upload with this key; LookupError once it has been dropped to make room."""
        with self._lock:
            if key not in self._held:
                raise LookupError(f"uploaded image {key[:12]}... is no longer held by the service; upload it again")
            self._held.move_to_end(key)
            return self._held[key]
