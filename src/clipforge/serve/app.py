"""The FastAPI application: routes of the JSON API, thumbnails, health, metrics and the web page."""
from __future__ import annotations

import hmac
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi import Query as QueryParam
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError

from clipforge.serve.duplicates import add_duplicates
from clipforge.serve.errors import add_error_handlers, validation_message
from clipforge.serve.knn import add_knn_service
from clipforge.serve.limits import LimitsMiddleware
from clipforge.serve.metrics import Metrics, MetricsMiddleware
from clipforge.serve.queries import SearchRequest, Term, Uploads
from clipforge.serve.service import SearchService
from clipforge.serve.thumbnails import THUMBNAIL_SIZES, Thumbnails
from clipforge.serve.thumbnails import default_folder as default_thumbnail_folder

PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ServeOptions:
    """How the service runs: ``token`` (None: no authentication), upload limits, where thumbnails are
    kept (default: ``thumbnails/`` in the index folder), whether only loopback Host names are answered, and
    the web origins besides this machine's whose pages may read clip-retrieval's routes (``cors_origins``)."""

    token: str | None = None
    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = 40_000_000
    cache_dir: str | None = None
    loopback_only: bool = True
    upload_cache_bytes: int = 64 * 2**20
    cors_origins: tuple[str, ...] = ()


class Result(BaseModel):
    id: int
    path: str
    score: float
    caption: str | None
    width: int
    height: int
    captured: str | None  # ISO 8601 capture time: EXIF, else the file's mtime
    tags: list[str]  # labels clipforge tag gave the item, best first
    time: float | None  # a video frame's time in its video (seconds); the video is /api/items/ID/video
    thumbnail_url: str


class SearchResponse(BaseModel):
    results: list[Result]
    next_cursor: str | None
    upload: str | None


def create_app(index, options: ServeOptions = ServeOptions(), compute: ThreadPoolExecutor | None = None) -> FastAPI:
    """The service over an open ``clipforge.search.Index`` (thumbnails kept in ``options.cache_dir``, else
    ``clipforge.serve.thumbnails.default_folder``); ``compute``: the thread that opened the index, to run every
    query on (``clipforge.serve.service.query_thread``; a new one by default)."""
    metrics = Metrics()
    service = SearchService(index, metrics, Uploads(options.upload_cache_bytes), options.max_pixels, compute)
    cache = Path(options.cache_dir) if options.cache_dir else default_thumbnail_folder(index)
    thumbnails = Thumbnails(index, cache, options.max_pixels)
    app = FastAPI(title="clipforge search", description="Search an image index by text, image or example.",
                  docs_url=None, redoc_url=None, openapi_url=None)  # the interactive docs load from a CDN
    app.state.service = service
    authorized = [Depends(_bearer_check(options.token))]
    _add_api(app, service, authorized, options.max_upload_bytes)
    add_knn_service(app, service, authorized, options.cors_origins)
    add_duplicates(app, service, authorized)
    _add_files(app, service, thumbnails, authorized, private=options.token is not None)
    _add_operations(app, index, metrics, authorized)
    _add_page(app)
    add_error_handlers(app)
    app.add_middleware(LimitsMiddleware, max_body=_body_limit(options.max_upload_bytes),
                       loopback_only=options.loopback_only)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_schema(app)
    return app


def _body_limit(max_upload: int) -> int:
    """The largest body accepted: an upload in base64 inside JSON, or in a multipart form, plus the rest."""
    return max_upload * 4 // 3 + 64 * 1024


def _bearer_check(token: str | None):
    def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get("clipforge_token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (the token "
                                     "the service was started with)", headers={"WWW-Authenticate": "Bearer"})
    return check


def _add_api(app: FastAPI, service: SearchService, authorized: list, max_upload: int) -> None:
    @app.post("/api/search", response_model=SearchResponse, dependencies=authorized,
              summary="Search by text, image, item id or a weighted combination")
    async def search(request: Request):
        body, image = await _read_search_body(request, max_upload)
        upload = await run_in_threadpool(service.check_upload, image) if image is not None else None
        return await service.run_query(body, upload)

    @app.get("/api/items/{item_id}", dependencies=authorized, summary="All metadata of an indexed item")
    def item(item_id: int):
        return service.item(item_id)


async def _read_search_body(request: Request, max_upload: int) -> tuple[SearchRequest, bytes | None]:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    image = None
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4, max_part_size=max_upload)
        unknown = sorted(set(form.keys()) - {"image", "request"})
        if unknown:
            raise ValueError(f"unknown form fields {unknown}; send 'image' (a file) and 'request' (JSON)")
        if form.get("image") is not None:
            image = await _file_bytes(form["image"], max_upload)
        text = form.get("request") or "{}"
    elif kind == "application/json":
        text = await request.body()
    else:
        raise HTTPException(415, f"unsupported content type {kind!r}: send application/json or multipart/form-data")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON in the request body: {e}") from None
    try:
        return SearchRequest.model_validate(data), image
    except ValidationError as e:
        raise HTTPException(422, validation_message(e.errors())) from None


async def _file_bytes(upload, max_upload: int) -> bytes:
    if isinstance(upload, str):
        raise ValueError("form field 'image' must be a file, not text")
    data = await upload.read(max_upload + 1)
    if len(data) > max_upload:
        raise HTTPException(413, f"the uploaded image is larger than {max_upload:,} bytes")
    return data


def _add_files(app: FastAPI, service: SearchService, thumbnails: Thumbnails, authorized: list, private: bool):
    cache_control = f"{'private' if private else 'public'}, max-age=86400"

    @app.get("/thumbnails/{item_id}", dependencies=authorized, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 304: {"description": "not modified"}},
             summary="A JPEG thumbnail of an indexed image")
    def thumbnail(item_id: int, request: Request, size: int = QueryParam(256, description="128, 256 or 512")):
        if size not in THUMBNAIL_SIZES:
            raise HTTPException(422, f"thumbnail size {size} is not one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        with service.metrics.timed("metadata"):
            item = service.index.item(item_id)
            content_key = item.hash if item.time is None else f"{item.hash}:{item.key}"  # a frame of its video
            etag = thumbnails.etag(content_key, size)
            headers = {"ETag": etag, "Cache-Control": cache_control}
            if etag in request.headers.get("if-none-match", ""):
                return Response(status_code=304, headers=headers)
            return Response(thumbnails.get(item_id, content_key, size), media_type="image/jpeg", headers=headers)


    @app.get("/api/items/{item_id}/video", dependencies=authorized, response_class=FileResponse,
             responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "the range asked for"}},
             summary="The video file a video frame's item comes from (byte ranges, for seeking)")
    def video(item_id: int):
        item = service.index.item(item_id)
        if item.time is None:
            raise HTTPException(404, f"item {item_id} is an image, not a frame of a video")
        kind = VIDEO_TYPES.get(Path(item.path).suffix.lower(), "application/octet-stream")
        if not Path(item.path).is_file():
            raise HTTPException(404, f"the video of item {item_id} is no longer on disk")
        return FileResponse(item.path, media_type=kind, headers={"Cache-Control": cache_control})


VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
               ".webm": "video/webm"}


def _add_operations(app: FastAPI, index, metrics: Metrics, authorized: list) -> None:
    @app.get("/healthz", summary="Liveness: the service is up and its index is open")
    def healthz():
        return {"status": "ok", "items": len(index)}

    @app.get("/metrics", dependencies=authorized, response_class=Response,
             summary="Prometheus metrics: requests, errors, encode/search/metadata latency")
    def prometheus():
        return Response(metrics.exposition(), media_type=metrics.content_type)


def _add_page(app: FastAPI) -> None:
    folder = resources.files(__package__) / "static"
    files = {name: (folder / name).read_bytes() for name in PAGE_FILES}

    @app.get("/", include_in_schema=False)
    def page():
        return Response(files["index.html"], media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in files:  # a fixed set of files: nothing from the request reaches the file system
            raise HTTPException(404, f"no page file named {name!r}")
        return Response(files[name], media_type=PAGE_FILES[name] + "; charset=utf-8", headers=_SECURITY_HEADERS)


def _add_schema(app: FastAPI) -> None:
    """Serve the OpenAPI schema, with POST /api/search's two body forms described (the route reads the
    body itself, to bound uploads and answer malformed JSON with a clear 400)."""
    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (SearchRequest, Term):
            components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components[model.__name__].pop("$defs", None)
        form = {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary", "description": "an image file to search by"},
            "request": {"type": "string", "description": "a SearchRequest as JSON (optional)"}}}
        schema["paths"]["/api/search"]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
            "multipart/form-data": {"schema": form}}}
        app.openapi_schema = schema
        return schema

    @app.get("/openapi.json", include_in_schema=False)
    def schema():
        return openapi()
