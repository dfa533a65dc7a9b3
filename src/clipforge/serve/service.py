"""What the routes ask of a search index, run in worker threads: queries checked for what a remote client
may ask (no file paths, known ids, images within the limits), encoded, searched, and turned into JSON rows."""
from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

from clipforge.data import load_image
from clipforge.serve.metrics import Metrics
from clipforge.serve.queries import SearchRequest, Term, Uploads, decode_cursor, decode_image_term, encode_cursor


def query_thread() -> ThreadPoolExecutor:
    """The one thread a service runs torch on (opening the index, encoding, searching), one query after another.

    One query already uses every core through torch's own (OpenMP) threads, and the index encodes under its
    lock anyway. It must be the only thread that runs torch: OpenMP keeps a team of threads per calling thread,
    and once the teams hold more threads than there are cores, GNU OpenMP stops its threads spinning between
    operations, so each of the hundreds of small operations of a query waits for its threads to wake (measured
    with ViT-B/32 on 2 cores: an int8 text query 8.3 ms on one team, 18.7 ms with a second team idle)."""
    return ThreadPoolExecutor(1, thread_name_prefix="clipforge-query")


class UploadGone(LookupError):
    """A query that refers to an uploaded image the service no longer holds."""


def thumbnail_url(item_id: int) -> str:
    return f"/thumbnails/{item_id}"


class SearchService:
    """``index`` (a ``clipforge.search.Index``) as the service uses it; ``max_pixels`` bounds uploads."""

    def __init__(self, index, metrics: Metrics, uploads: Uploads, max_pixels: int,
                 compute: ThreadPoolExecutor | None = None):
        self.index, self.metrics, self.uploads, self.max_pixels = index, metrics, uploads, max_pixels
        self._compute = compute or query_thread()

    async def run_query(self, request: SearchRequest, upload_key: str | None = None) -> dict:
        """``search`` on the query thread, off the event loop."""
        return await self.on_query_thread(self.search, request, upload_key)

    async def on_query_thread(self, function, *args):
        """``function(*args)`` on the one thread that encodes and searches, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, function, *args)

    def warm_up(self) -> None:
        """Load the model, run it once and search once as a client's plain search goes, so that the first client
        waits for neither the model nor (where exact search answers it) the float32 copies of the vectors."""
        from clipforge.search import Query
        vector = self._compute.submit(self.index.encode_query, Query.from_terms([("text", "a photo")])).result()
        if len(self.index):
            # as a client's search goes (the approximate index where there is one): exact search would read every
            # vector of a large index before the first client is served
            self._compute.submit(self.index.search, vector, 1).result()

    def check_upload(self, data: bytes) -> str:
        """Decode an uploaded image to check it (a ValueError naming what is wrong); returns its upload key."""
        load_image(data, max_pixels=self.max_pixels, name="the uploaded image")
        return self.uploads.add(data)

    def search(self, request: SearchRequest, upload_key: str | None = None) -> dict:
        offset = decode_cursor(request.cursor)
        query = self._query(request, upload_key)
        with self.metrics.timed("encode"):  # the index encodes one query at a time (its own lock)
            vector = self.index.encode_query(query)
        with self.metrics.timed("search"):
            found = self.index.search(vector, top_k=request.top_k, offset=offset, folder=request.folder,
                                      min_score=request.min_score, dedup=request.dedup, captions=request.captions,
                                      after=request.after, before=request.before,
                                      caption=request.caption_contains, sort=request.sort, tags=query.tags)
        more = len(found) == request.top_k
        return {"results": [result_row(r) for r in found], "upload": upload_key,
                "next_cursor": encode_cursor(offset + len(found)) if more else None}

    def item(self, item_id: int) -> dict:
        with self.metrics.timed("metadata"):
            item = self.index.item(item_id)
        row = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else dict(vars(item))
        tags = [{"label": label, "score": score} for label, score in self.index.tags(item_id)]
        video = {"time": item.time, "video_url": f"/api/items/{item_id}/video"} if item.time is not None else {}
        return {**row, "tags": tags, **video, "thumbnail_url": thumbnail_url(item_id)}

    def _query(self, request: SearchRequest, upload_key: str | None):
        """The request as one Query: the query string's terms and tag:LABEL filters, the terms, the upload,
        and the ``tags`` field."""
        from clipforge.search import Query
        parsed = self.index.parse(request.query, look_up_files=False) if request.query else Query((), ())
        terms = self._checked_terms(parsed.terms)
        terms += [self._term(term) for term in request.terms]
        if upload_key is not None:
            terms.append(("bytes", self._upload(upload_key), 1.0))
        if not terms:
            raise ValueError("empty query: give a query string, terms, or an image")
        tags = tuple(dict.fromkeys([*parsed.tags, *request.tags]))
        return Query(Query.from_terms(terms).terms, tags)

    def _checked_terms(self, terms) -> list:
        for term in terms:
            if term.kind == "id":
                self.index.item(term.value)  # KeyError (404) for an unknown id
            if term.kind == "image":  # a remote client names no files on this machine
                raise ValueError(f"query term {term.value!r} reads as an image path, and the service reads no "
                                 f"files named in a query: upload the image instead, or put text in double quotes")
        return list(terms)

    def _term(self, term: Term) -> tuple:
        if term.text is not None:
            return ("text", term.text, term.weight)
        if term.id is not None:
            self.index.item(term.id)
            return ("id", term.id, term.weight)
        data = self._upload(term.upload) if term.upload is not None else decode_image_term(term.image)
        load_image(data, max_pixels=self.max_pixels, name="the query image")
        return ("bytes", data, term.weight)

    def _upload(self, key: str):
        try:
            return self.uploads.get(key)
        except LookupError as e:
            raise UploadGone(str(e)) from None


def result_row(result) -> dict:
    return {"id": result.id, "path": result.path, "score": float(result.score), "caption": result.caption,
            "width": result.width, "height": result.height, "captured": result.captured, "tags": list(result.tags),
            "time": result.time, "thumbnail_url": thumbnail_url(result.id)}
