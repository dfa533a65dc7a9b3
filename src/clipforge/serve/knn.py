"""clip-retrieval's back-end API over a clipforge index: ``POST /knn-service``, ``POST /metadata`` and
``GET /indices-list`` with the request and answer shapes of clip-retrieval's ``clip_back.py``, so that its
``ClipClient`` and its web front end (clip-front) search a clipforge index."""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.middleware.cors import CORSMiddleware

from clipforge.data import load_image
from clipforge.serve.errors import validation_message
from clipforge.serve.service import SearchService, thumbnail_url

INDEX_NAME = "clipforge"  # the one name in /indices-list: a service serves one index
MAX_RESULTS = 10_000  # clip-front asks for 10,000 ids when it downloads a result list
DEDUP_COSINE = 0.94  # clip-retrieval's cosine above which two results are duplicates (get_non_uniques)
ROUTES = ("/knn-service", "/metadata", "/indices-list")
# Pages served from this machine (clip-front run locally) may read the answers; a page from anywhere else may
# not unless its origin is listed in ServeOptions.cors_origins.
LOOPBACK_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?"


class KnnRequest(BaseModel):
    """The body clip-retrieval's ``ClipClient`` and clip-front send. Fields they send that a clipforge index
    has nothing for (``use_safety_model``, ``use_violence_detector``, ``aesthetic_score``,
    ``aesthetic_weight``) are ignored, as clip-retrieval's back end ignores them without those models."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = Field(None, max_length=2000)
    image: str | None = Field(None, description="an encoded image file, base64")
    image_url: str | None = Field(None, max_length=2000, description="only a result url of this service")
    embedding_input: list[float] | None = Field(None, max_length=16384)
    modality: Literal["image", "text"] = Field("image", description="text: rank by the items' caption vectors")
    num_images: int = Field(40, ge=1, le=MAX_RESULTS, description="results that carry their metadata")
    num_result_ids: int | None = Field(None, ge=1, le=MAX_RESULTS, description="results (default num_images)")
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = False


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int] = Field(max_length=MAX_RESULTS)
    indice_name: str | None = None


def add_knn_service(app: FastAPI, service: SearchService, authorized: list, cors_origins=()) -> None:
    """Add clip-retrieval's routes to ``app`` (behind the ``authorized`` dependencies), with CORS for them
    for loopback origins and ``cors_origins``."""
    @app.get("/indices-list", dependencies=authorized, summary="clip-retrieval: the names of the indexes served")
    def indices_list() -> list[str]:
        return [INDEX_NAME]

    @app.post("/knn-service", dependencies=authorized, openapi_extra=_body_schema(KnnRequest),
              summary="clip-retrieval: the nearest items to a text, an image or a vector")
    async def knn_service(request: Request) -> list[dict]:
        body = _read(KnnRequest, await request.body())
        _check_index_name(body.indice_name)
        return await service.on_query_thread(_knn, service, body, _base(request))

    @app.post("/metadata", dependencies=authorized, openapi_extra=_body_schema(MetadataRequest),
              summary="clip-retrieval: the metadata of items by id")
    async def metadata(request: Request) -> list[dict]:
        body = _read(MetadataRequest, await request.body())
        _check_index_name(body.indice_name)
        return await run_in_threadpool(_metadata, service, body.ids, _base(request))

    app.add_middleware(_CorsOnRoutes, paths=ROUTES, origins=tuple(cors_origins))


class _CorsOnRoutes:
    """Starlette's CORS middleware for ``paths`` only: clip-front runs on another origin than the service
    and must read these answers, while the rest of the API stays readable by its own page only."""

    def __init__(self, app, paths: tuple[str, ...], origins: tuple[str, ...]):
        self.app, self.paths = app, paths
        self.cors = CORSMiddleware(app, allow_origins=list(origins), allow_origin_regex=LOOPBACK_ORIGINS,
                                   allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                                   max_age=600)

    async def __call__(self, scope, receive, send):
        inner = self.cors if scope["type"] == "http" and scope["path"] in self.paths else self.app
        await inner(scope, receive, send)


def _body_schema(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its body itself (any content type: ClipClient sends
    none, clip-front text/plain)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _read(model: type[BaseModel], body: bytes):
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON in the request body: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise HTTPException(422, validation_message(e.errors())) from None


def _check_index_name(name: str | None) -> None:
    if name not in (None, "", INDEX_NAME):
        raise KeyError(f"no index named {name!r}: this service serves one, {INDEX_NAME!r} (GET /indices-list)")


def _base(request: Request) -> str:
    """The service's URL as the client addressed it, without the trailing slash."""
    return str(request.base_url).rstrip("/")


def _knn(service: SearchService, body: KnnRequest, base: str) -> list[dict]:
    vector = _query_vector(service, body, base)
    with service.metrics.timed("search"):
        found = service.index.search(vector, top_k=body.num_result_ids or body.num_images,
                                     dedup=DEDUP_COSINE if body.deduplicate else None,
                                     captions=body.modality == "text")
    # as clip-retrieval: the first num_images results carry their metadata, the rest only id and similarity
    # (clip-front asks /metadata for those as it scrolls)
    return [{"id": r.id, "similarity": float(r.score),
             **(_item_metadata(r.id, r.path, r.caption, r.width, r.height, base) if rank < body.num_images else {})}
            for rank, r in enumerate(found)]


def _query_vector(service: SearchService, body: KnnRequest, base: str) -> np.ndarray:
    from clipforge.search import Query
    given = [name for name in ("text", "image", "image_url", "embedding_input") if getattr(body, name)]
    if len(given) != 1:
        raise ValueError(f"give exactly one of text, image (base64), image_url or embedding_input; "
                         f"got {', '.join(given) or 'none'}")
    if body.use_mclip:
        raise ValueError("this service has no multilingual CLIP (use_mclip): send use_mclip false, and the "
                         "index's own model encodes the text")
    if body.embedding_input:
        return _unit(body.embedding_input, service.index.dim)
    if body.text:
        term = ("text", body.text)
    elif body.image:
        term = ("bytes", _decode_base64(body.image))
        load_image(term[1], max_pixels=service.max_pixels, name="the query image")  # bounds before encoding
    else:
        term = ("id", _own_item(body.image_url, base))
        service.index.item(term[1])  # KeyError (404) for an unknown id
    with service.metrics.timed("encode"):
        return service.index.encode_query(Query.from_terms([term]))


def _unit(values: list[float], dim: int) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (dim,):
        raise ValueError(f"embedding_input has {len(vector)} numbers, and this index's vectors have {dim}")
    norm = np.linalg.norm(vector)
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError("embedding_input must be finite numbers, not all zero")
    return (vector / norm).astype(np.float32)


def _decode_base64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("'image' is not valid base64 (send the encoded image file's bytes in base64)") from None


def _own_item(url: str, base: str) -> int:
    """The item id of a result url of this service (clip-front searches by a result's url): the service fetches
    no URL a client names, so any other URL is refused."""
    match = re.fullmatch(re.escape(base) + r"/thumbnails/([0-9]{1,18})(\?[^#]*)?", url)
    if match is None:
        raise ValueError(f"image_url {url[:200]!r} is not a result url of this service, and the service fetches "
                         f"no URL a client names: send the image itself, base64-encoded, as 'image'")
    return int(match[1])


def _metadata(service: SearchService, ids: list[int], base: str) -> list[dict]:
    with service.metrics.timed("metadata"):
        items = [service.index.item(i) for i in ids]  # KeyError (404) names an unknown id
    return [{"id": item.id, "metadata": _item_metadata(item.id, item.location, item.caption, item.width,
                                                       item.height, base)} for item in items]


def _item_metadata(item_id: int, path: str, caption: str | None, width: int, height: int, base: str) -> dict:
    """clip-retrieval's columns ``url`` (the item's thumbnail on this service) and ``caption`` (left out when
    the item has none: clip-front shows a caption whenever the key is present), plus clipforge's own."""
    row = {"url": base + thumbnail_url(item_id), "path": path, "width": width, "height": height}
    return {**row, "caption": caption} if caption is not None else row
