"""Every failure answered as JSON ``{"error": message, "status": code}``: a 4xx naming what was wrong for a
bad request, and a 500 without a traceback for a fault of the service."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from clipforge.data import BadSample
from clipforge.serve.limits import BodyTooLarge
from clipforge.serve.service import UploadGone

_log = logging.getLogger("clipforge.serve")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def validation_message(errors) -> str:
    """One line per problem in a pydantic or FastAPI validation error: where, then what."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def add_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    async def invalid(request: Request, e: RequestValidationError):
        return _error(422, validation_message(e.errors()))

    async def bad_image(request: Request, e: BadSample):
        return _error(413 if e.reason == "too_many_pixels" else 400, str(e))

    async def internal(request: Request, e: Exception):
        _log.exception("error answering %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); the service log has the details")

    handlers = {HTTPException: http_error, RequestValidationError: invalid, BadSample: bad_image,
                BodyTooLarge: lambda r, e: _error(413, str(e)), UploadGone: lambda r, e: _error(410, str(e)),
                KeyError: lambda r, e: _error(404, _message(e)), ValueError: lambda r, e: _error(400, str(e)),
                Exception: internal}
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
