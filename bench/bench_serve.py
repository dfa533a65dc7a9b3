"""End-to-end text queries through ``clipforge serve`` (HTTP, JSON) against a 100,000-item index, ViT-B/32.

The model is ViT-B/32 with random weights (timing only). A real index is built by ``Index.build`` from a few
generated JPEGs, then grown to ``--items`` rows of random unit vectors written in the index's own on-disk
format (``clipforge.search.store``), each row pointing at one of the real images. The service runs in its own
process (the ``clipforge serve`` command); the reference, measured in the same run and interleaved query by
query, is the library called directly in this process (``Index.encode_query`` + ``Index.search``, holding the
service's in-RAM copies of the vectors too): the ratio is what HTTP, JSON and the service add. Then 16 concurrent clients measure throughput.
``--precision int8`` builds the index in int8, so that the service encodes its queries in int8.
Usage: ``python bench/bench_serve.py [--items 100000] [--queries 100] [--concurrent-requests 400]
[--precision fp32|int8] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import environment  # noqa: E402

from clipforge.data import ShapesDataset  # noqa: E402
from clipforge.io.factory import create_model, save  # noqa: E402
from clipforge.search import Index, store  # noqa: E402
from clipforge.serve.server import DEFAULT_FLOAT32_MIB, start_child  # noqa: E402

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PLACES = ("on a beach", "at night", "in the snow", "on a table", "in a forest")


def queries(n: int) -> list[str]:
    """``n`` different captions, so that no layer can answer from a cache."""
    return [f"a photo of a {COLOURS[i % 8]} {SHAPES[i // 8 % 6]} {PLACES[i // 48 % 5]} number {i}" for i in range(n)]


def build_index(folder: Path, items: int, seed: int = 0, clusters: int | None = None,
                precision: str = "fp32") -> Path:
    """A ViT-B/32 (random weights) index of 32 real JPEGs, grown to ``items`` rows of random unit vectors
    (``clusters``: drawn around that many random centres, as real image embeddings gather by content;
    uniformly random unit vectors in 512 dimensions are all about equally far apart, the worst case for a
    graph or cell index)."""
    torch.manual_seed(seed)
    save(create_model("ViT-B-32-quickgelu"), folder / "model")
    photos = folder / "photos"
    photos.mkdir()
    shapes = ShapesDataset(32, seed=seed, image_size=224)
    for i in range(32):
        shapes.image(i).save(photos / f"{i:05d}.jpg", quality=90)
    index_dir = folder / "index"
    Index.build(index_dir, [str(photos)], model=str(folder / "model"), progress=False, precision=precision).close()
    _grow(index_dir, items, np.random.default_rng(seed), clusters=clusters)
    return index_dir


def _grow(index_dir: Path, items: int, rng: np.random.Generator, batch: int = 20000,
          clusters: int | None = None) -> None:
    """Append random unit vectors and rows pointing at the indexed images, as the indexer commits them:
    vectors first, then one transaction for the rows that use them."""
    db = store.connect(index_dir)
    real = db.execute(f"SELECT {', '.join(store.ITEM_COLUMNS)} FROM items").fetchall()
    dim = int(store.read_config(index_dir)["dim"])
    writer = store.SegmentWriter(index_dir, "images", dim)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) if clusters else None
    while (first := store.next_row(db, "images")) < items:
        count = min(batch, items - first)
        vectors = rng.standard_normal((count, dim)).astype(np.float32)
        if centres is not None:  # a centre plus noise of about the same length: neighbours share a centre
            vectors = centres[rng.integers(0, clusters, count)] + 1.0 * vectors
        writer.write(first, (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16))
        with db:
            for n in range(count):
                donor = dict(real[(first + n) % len(real)])
                donor.update(id=None, key=f"bench-{first + n}", row=first + n, caption_row=None)
                db.execute(f"INSERT INTO items ({', '.join(store.ITEM_COLUMNS)}) VALUES "
                           f"({', '.join('?' * len(store.ITEM_COLUMNS))})", [donor[c] for c in store.ITEM_COLUMNS])
            db.execute("INSERT OR REPLACE INTO rows VALUES ('images', ?)", (first + count,))
    writer.close()
    db.close()


def client(base: str):
    """An HTTP client that sends each request at once (TCP_NODELAY, as browsers and curl do): without it, a
    POST's body waits for the acknowledgement of its headers, which Linux delays by up to 40 ms."""
    import httpx
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(base_url=base, timeout=120, transport=httpx.HTTPTransport(socket_options=options))


def service_steps(metrics: str) -> dict[str, float]:
    """Mean milliseconds of the service's encode and search steps, over every query it answered."""
    means = {}
    for step in ("encode", "search"):
        total, count = (float(re.search(rf"^clipforge_{step}_seconds_{part} (\S+)$", metrics, re.M).group(1))
                        for part in ("sum", "count"))
        means[step] = 1000 * total / count
    return means


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def sequential(index: Index, client, texts: list[str]) -> dict[str, list[float]]:
    """One query at a time, alternating the library in this process and the service over HTTP."""
    times = {"library": [], "http": []}
    for text in texts:
        start = time.perf_counter()
        index.search(index.encode_query(text), top_k=10)
        times["library"].append(time.perf_counter() - start)
        start = time.perf_counter()
        response = client.post("/api/search", json={"query": text, "top_k": 10})
        times["http"].append(time.perf_counter() - start)
        if response.status_code != 200 or len(response.json()["results"]) != 10:
            raise RuntimeError(f"the service answered {response.status_code}: {response.text[:200]}")
    return times


def concurrent(base: str, texts: list[str], clients: int = 16) -> tuple[float, list[float], int]:
    """(seconds for all, latencies, errors) of ``texts`` sent by ``clients`` concurrent clients."""
    import threading
    local = threading.local()

    def one(text: str):
        if not hasattr(local, "client"):
            local.client = client(base)
        start = time.perf_counter()
        status = local.client.post("/api/search", json={"query": text, "top_k": 10}).status_code
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, texts))
    return time.perf_counter() - start, [t for t, _ in outcomes], sum(s != 200 for _, s in outcomes)


def run(items: int = 100_000, n_queries: int = 100, concurrent_requests: int = 400, precision: str = "fp32") -> dict:
    texts = queries(n_queries + concurrent_requests + 5)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index_dir = build_index(Path(tmp), items, precision=precision)
        print(f"built a {items:,}-item ViT-B/32 {precision} index in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        process, base = start_child(index_dir)
        try:
            index = Index.open(index_dir, device="cpu", float32_mib=DEFAULT_FLOAT32_MIB)
            with client(base) as http:
                sequential(index, http, texts[:5])  # warm-up: model, page cache, connection
                times = sequential(index, http, texts[5:5 + n_queries])
            seconds, latencies, errors = concurrent(base, texts[5 + n_queries:])
            with client(base) as http:
                steps = service_steps(http.get("/metrics").text)
        finally:
            process.terminate()
            process.wait(timeout=60)
    library, http = statistics.median(times["library"]), statistics.median(times["http"])
    return {"items": items, "model": "ViT-B/32 (random weights)", "precision": precision, "queries": n_queries,
            "http_p50_ms": 1000 * http, "http_p99_ms": 1000 * percentile(times["http"], 0.99),
            "library_p50_ms": 1000 * library, "http_vs_library": http / library,
            "concurrent_clients": 16, "concurrent_requests": concurrent_requests,
            "concurrent_queries_per_s": concurrent_requests / seconds,
            "concurrent_p50_ms": 1000 * statistics.median(latencies),
            "concurrent_p99_ms": 1000 * percentile(latencies, 0.99), "errors": errors,
            **{f"service_{step}_mean_ms": ms for step, ms in steps.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100, help="sequential queries timed (default 100)")
    parser.add_argument("--concurrent-requests", type=int, default=400, help="requests from 16 clients (default 400)")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="the index's (and so its queries') precision (default fp32)")
    parser.add_argument("--json", help="write the figures and the environment here")
    args = parser.parse_args()
    figures = run(args.items, args.queries, args.concurrent_requests, args.precision)
    print(f"text query through HTTP, {figures['items']:,} items, {figures['model']}, {figures['precision']}, top 10:")
    print(f"  one client:  p50 {figures['http_p50_ms']:.1f} ms, p99 {figures['http_p99_ms']:.1f} ms; library called "
          f"directly p50 {figures['library_p50_ms']:.1f} ms (HTTP / library {figures['http_vs_library']:.2f}x)")
    print(f"  16 clients:  {figures['concurrent_queries_per_s']:.1f} queries/s, p50 {figures['concurrent_p50_ms']:.0f} "
          f"ms, p99 {figures['concurrent_p99_ms']:.0f} ms, {figures['errors']} errors")
    print(f"  in the service, mean over all queries: encode {figures['service_encode_mean_ms']:.1f} ms, "
          f"search {figures['service_search_mean_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "environment": environment("cpu")}, indent=2))


if __name__ == "__main__":
    main()
