"""``GET /api/duplicates?threshold=T``: the groups of duplicate photos in the served index
(``clipforge.search.duplicates``), computed on the service's query thread and kept for the index's size and the
threshold, so that the page's "Similar photos" view asks again at no cost. It reads only: nothing is deleted."""
from __future__ import annotations

from collections import OrderedDict

from fastapi import FastAPI
from fastapi import Query as QueryParam
from pydantic import BaseModel

from clipforge.search.duplicates import DEFAULT_THRESHOLD, find_duplicates
from clipforge.serve.service import SearchService, thumbnail_url

KEPT_ANSWERS = 4  # thresholds remembered at once


class DuplicateFile(BaseModel):
    id: int
    path: str
    size: int
    width: int
    height: int
    captured: str | None
    captured_from: str | None
    hash: str
    similarity: float  # cosine to the keeper's vector
    exact: bool  # the keeper's bytes
    thumbnail_url: str


class DuplicateGroupRow(BaseModel):
    kind: str  # "exact" (every file has the keeper's bytes) or "near"
    keeper: int  # the suggested keeper's id, members[0]
    redundant_bytes: int
    members: list[DuplicateFile]


class DuplicatesResponse(BaseModel):
    threshold: float
    items: int
    groups: list[DuplicateGroupRow]


class DuplicateAnswers:
    """The answers for the latest ``KEPT_ANSWERS`` (index size, threshold) pairs; used from the query thread
    only, so without a lock."""

    def __init__(self, index):
        self.index = index
        self._answers: OrderedDict[tuple[int, float], dict] = OrderedDict()

    def get(self, threshold: float) -> dict:
        key = (len(self.index), float(threshold))
        if key not in self._answers:
            groups = find_duplicates(self.index, threshold)
            self._answers[key] = {"threshold": threshold, "items": key[0], "groups": [_row(g) for g in groups]}
            while len(self._answers) > KEPT_ANSWERS:
                self._answers.popitem(last=False)
        self._answers.move_to_end(key)
        return self._answers[key]


def _row(group) -> dict:
    row = group.to_dict()
    for member in row["members"]:
        member["thumbnail_url"] = thumbnail_url(member["id"])
    return row


def add_duplicates(app: FastAPI, service: SearchService, authorized: list) -> None:
    """Add ``GET /api/duplicates`` to ``app``, behind the ``authorized`` dependencies."""
    answers = DuplicateAnswers(service.index)

    @app.get("/api/duplicates", response_model=DuplicatesResponse, dependencies=authorized,
             summary="Groups of duplicate photos (same bytes, or image cosine at least threshold), keeper first")
    async def duplicates(threshold: float = QueryParam(DEFAULT_THRESHOLD, gt=0, le=1, description=(
            "near-duplicates have image cosine at least this"))):
        return await service.on_query_thread(answers.get, threshold)
