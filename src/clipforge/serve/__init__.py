"""The HTTP service over a search index (the ``serve`` extra): a JSON API, thumbnails, Prometheus metrics and
an offline web page, built with FastAPI and run by uvicorn."""
from __future__ import annotations

from clipforge.serve.app import ServeOptions, create_app
from clipforge.serve.server import serve

__all__ = ["ServeOptions", "create_app", "serve"]
