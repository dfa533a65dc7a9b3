"""An index that keeps itself current: after a first incremental run, file-system events on the sources
(watchdog) trigger another incremental run once they have settled, with a periodic rescan as the fallback for
file systems that send no events (network shares). Each run is an ordinary update, with its crash safety:
a watcher killed at any moment loses nothing that its next start does not redo."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

from clipforge.search.index import Index

SETTLE_S = 1.0     # a run starts once the sources have been quiet this long...
MAX_WAIT_S = 10.0  # ...or this long after the first unhandled event, for sources that never go quiet
RESCAN_S = 300.0   # a full incremental run at least this often, events or not


def _observer():
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        raise RuntimeError("--watch needs watchdog: pip install 'clipforge[watch]'") from None
    return Observer, FileSystemEventHandler


def _inside(path: str, folders: set[str]) -> bool:
    path = os.path.abspath(path)
    return any(path == f or path.startswith(f + os.sep) for f in folders)


def watched_folders(sources: list[str]) -> list[str]:
    """The folders whose events matter: a folder source itself, a table's or a shard's folder."""
    folders = set()
    for source in sources:
        path = Path(str(source).split("{", 1)[0]) if "{" in str(source) else Path(source)
        folder = path if path.is_dir() else path.parent
        folders.add(os.path.abspath(folder if str(folder) else "."))
    return sorted(folders)


def watch(location, sources: list[str], build: Callable[[], Index], update: Callable[[Index], dict],
          report: Callable[[dict], None], stop: threading.Event | None = None, rescan_s: float = RESCAN_S,
          settle_s: float = SETTLE_S) -> None:
    """Run ``build()`` (the first run), then ``update(index)`` after each settled burst of events under the
    sources' folders and every ``rescan_s`` seconds, reporting each run's summary, until ``stop`` is set."""
    stop = stop or threading.Event()
    Observer, Handler = _observer()
    changed = threading.Event()
    ignored = {os.path.abspath(location)} if not str(location).startswith(("postgresql:", "postgres:")) else set()

    class _Events(Handler):
        def on_any_event(self, event):
            paths = [getattr(event, "src_path", ""), getattr(event, "dest_path", "")]
            if event.event_type in ("opened", "closed_no_write") or all(not p or _inside(p, ignored) for p in paths):
                return  # reads, and the index's own files (an index folder inside a watched folder)
            changed.set()

    observer = Observer()
    for folder in watched_folders(sources):
        observer.schedule(_Events(), folder, recursive=True)
    observer.start()
    try:
        index = build()
        report(index.last_update)
        last_run = time.monotonic()
        while not stop.is_set():
            if not changed.wait(timeout=min(0.5, max(0.0, rescan_s - (time.monotonic() - last_run)))):
                if time.monotonic() - last_run < rescan_s:
                    continue
            else:
                first = time.monotonic()
                changed.clear()
                while not stop.is_set() and time.monotonic() - first < MAX_WAIT_S:  # settle
                    if not changed.wait(timeout=settle_s):
                        break
                    changed.clear()
            if stop.is_set():
                break
            report(update(index))
            last_run = time.monotonic()
    finally:
        observer.stop()
        observer.join(timeout=10)
