"""``clipforge serve``: the HTTP search service and web page over an index built by ``clipforge index``."""
from __future__ import annotations

import argparse
import os

from clipforge.cli.options import add_device_option, add_nprobe_option, add_precision_option, console_warnings

HELP = """Serve an index (a folder, or a postgresql:// URL) over HTTP: a web page at / to search by text, by image or by
example, and a JSON API (POST /api/search, GET /api/items/ID, GET /thumbnails/ID, GET /healthz, GET /metrics;
schema at /openapi.json). Listens on 127.0.0.1 unless --host says otherwise; --token (or the CLIPFORGE_TOKEN
environment variable) makes every request need 'Authorization: Bearer TOKEN'. Needs the serve extra: pip
install 'clipforge[serve]'."""

EXAMPLES = """examples:
  clipforge serve photos.index
  clipforge serve photos.index --port 8080
  CLIPFORGE_TOKEN=s3cret clipforge serve photos.index --host 0.0.0.0
  clipforge serve 'postgresql://me@dbhost/photos?table=pictures' --port 8001"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("index", metavar="INDEX", help="an index written by clipforge index: a folder, or a "
                                                       "postgresql:// URL with ?table=NAME")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                            "machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--token", default=os.environ.get("CLIPFORGE_TOKEN") or None,
                        help="require this bearer token on every request (default: $CLIPFORGE_TOKEN)")
    parser.add_argument("--max-upload-mb", type=float, default=16, help="largest query image accepted (default 16)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="largest query or thumbnail image decoded, in pixels (default 40,000,000)")
    parser.add_argument("--cache-dir", metavar="DIR", help="where thumbnails are kept (default INDEX/thumbnails; for "
                                                           "a PostgreSQL index ~/.cache/clipforge/thumbnails/TABLE-*)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin (e.g. http://192.168.1.5:3005) besides this machine's whose pages may "
                             "call clip-retrieval's routes (/knn-service, /metadata, /indices-list); repeatable")
    add_device_option(parser)
    add_precision_option(parser, "queries")
    add_nprobe_option(parser)
    parser.add_argument("--float32-mib", type=float, default=1024, metavar="MIB",
                        help="RAM for copies of the vectors that make exact search faster: an int8 screen "
                             "(N*(D+8) bytes for N vectors of size D, from 32,768 vectors) and float32 copies "
                             "(N*D*4 bytes) in what is left (default 1024; 0 reads every query from the float16 "
                             "files)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="uvicorn's log level (default warning; info logs each request)")


def run(args: argparse.Namespace) -> int:
    try:
        from clipforge.serve import ServeOptions, serve
    except ImportError as e:
        raise RuntimeError(f"clipforge serve needs the serve extra ({e.name} is missing): "
                           f"pip install 'clipforge[serve]'") from None
    if args.token is not None and not args.token.strip():
        raise ValueError("--token is empty: give a non-empty token, or leave it out to serve without one")
    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise ValueError(f"--max-upload-mb and --max-pixels must be positive, got {args.max_upload_mb} and "
                         f"{args.max_pixels}")
    if args.float32_mib < 0:
        raise ValueError(f"--float32-mib must be at least 0, got {args.float32_mib}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0 to 65535)")
    options = ServeOptions(token=args.token, max_upload_bytes=int(args.max_upload_mb * 2**20),
                           max_pixels=args.max_pixels, cache_dir=args.cache_dir,
                           cors_origins=tuple(args.cors_origin))
    try:
        with console_warnings("serve"):
            serve(args.index, host=args.host, port=args.port, options=options, device=args.device,
                  log_level=args.log_level, float32_mib=args.float32_mib, precision=args.precision,
                  nprobe=args.nprobe)
    except KeyboardInterrupt:
        pass
    return 0
