"""Running the service: open the index, load the model once, bind the socket and hand it to uvicorn."""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from dataclasses import replace

import uvicorn

from clipforge.serve.app import ServeOptions, create_app
from clipforge.serve.service import query_thread

DEFAULT_FLOAT32_MIB = 1024  # RAM for float32 copies of the vectors (clipforge serve --float32-mib)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); OSError names the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose proto is
    # IPPROTO_TCP, and without that a response written in two parts waits for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions = ServeOptions(),
          device: str | None = None, log_level: str = "warning", float32_mib: float = DEFAULT_FLOAT32_MIB,
          precision: str | None = None, nprobe: int | None = None) -> None:
    """Serve the index at ``index_dir`` (a folder or a PostgreSQL URL) until interrupted; prints the address
    once it is listening.
    ``float32_mib``: RAM for copies of the vectors; ``precision``: the queries' (None: the index's);
    ``nprobe``: the approximate index's cells probed per query (None: as tuned); see
    ``clipforge.search.Index.open``."""
    from clipforge.search import Index
    if not is_loopback(host) and options.token is None:
        print(f"clipforge serve: warning: listening on {host}, which other machines can reach, without a token: "
              f"anyone who can connect can search and view every indexed image; pass --token (or set "
              f"CLIPFORGE_TOKEN)", file=sys.stderr)
    compute = query_thread()  # torch runs on this thread only, from opening the index on (see query_thread)
    index = compute.submit(Index.open, index_dir, device=device, float32_mib=float32_mib, precision=precision,
                           nprobe=nprobe).result()
    app = create_app(index, replace(options, loopback_only=is_loopback(host)), compute)
    app.state.service.warm_up()
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"clipforge serve: {len(index):,} items from {index.store.location} at "
          f"http://{shown}:{sock.getsockname()[1]}/",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def start_child(index_dir, *options: str, stderr=None) -> tuple[subprocess.Popen, str]:
    """``clipforge serve INDEX --port 0 OPTIONS...`` in a child process, without ``CLIPFORGE_TOKEN`` from this
    environment; returns (the process, its base URL without the trailing slash) once it listens, or kills it
    and raises RuntimeError with what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "CLIPFORGE_TOKEN"}
    process = subprocess.Popen([sys.executable, "-m", "clipforge", "serve", str(index_dir), "--port", "0", *options],
                               stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        detail = f"\n{open(stderr.name).read()}" if getattr(stderr, "name", None) else ""
        raise RuntimeError(f"clipforge serve did not start: {line!r}{detail}")
    return process, line.rsplit(" at ", 1)[1].strip().rstrip("/")
