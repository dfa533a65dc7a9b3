"""The PostgreSQL store beside the folder store on the same 100,000 vectors (ViT-B/32 random weights, d = 512).

The folder index is ``bench_serve.build_index``'s (32 real JPEGs grown to ``--items`` rows of random unit
vectors); the PostgreSQL index is a copy of it (``Index.copy``: the same ids and vectors), on a throwaway
PostgreSQL 16 + pgvector 0.6 from the pgserver wheel (tests/pg_server.py, Unix socket, shared_buffers 1 GB),
with its HNSW index built and tuned by ``clipforge index --approximate always``'s code. Measured in one run,
interleaved query by query:

- search p50, library: the folder store's exact search (with the service's float32 copies) and PostgreSQL's
  exact and HNSW search, on the same query vectors (midpoints of stored pairs; encoding left out);
- recall@10 of HNSW against the folder store's exact results, on those queries (independent of PostgreSQL);
- text query p50 over HTTP: ``clipforge serve`` on each store, one at a time, in the order A B B A;
- indexing throughput (images/s) of ``clipforge index`` into PostgreSQL with one writer (2 torch threads),
  then with two writers on disjoint halves at once (1 thread each: the same cores), and the folder store's
  for reference; the two writers' table is checked to hold every image once.

The synthetic vectors gather around ``--clusters`` random centres, as image embeddings do by content; on
uniformly random unit vectors (every point about equally far from every other) no graph index reaches 0.95.
Usage: ``python bench/bench_postgres.py [--items 100000] [--clusters 1000] [--queries 100] [--images 384]
[--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import numpy as np  # noqa: E402

from bench_serve import build_index, client, percentile, queries  # noqa: E402
from common import environment  # noqa: E402
from pg_server import LocalPostgres  # noqa: E402

from clipforge.data import ShapesDataset  # noqa: E402
from clipforge.search import Index  # noqa: E402
from clipforge.search.approximate import sample_queries  # noqa: E402
from clipforge.serve.server import DEFAULT_FLOAT32_MIB, start_child  # noqa: E402


def _ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 2)


def search_library(folder: Index, pg: Index, vectors: np.ndarray) -> dict:
    times = {"folder exact": [], "postgres exact": [], "postgres hnsw": []}
    recall = []
    for v in vectors:
        start = time.perf_counter()
        truth = folder.search(v, top_k=10, approximate=False)
        times["folder exact"].append(time.perf_counter() - start)
        start = time.perf_counter()
        exact = pg.search(v, top_k=10, approximate=False)
        times["postgres exact"].append(time.perf_counter() - start)
        start = time.perf_counter()
        close = pg.search(v, top_k=10, approximate=True)
        times["postgres hnsw"].append(time.perf_counter() - start)
        if [r.id for r in exact][:9] != [r.id for r in truth][:9]:
            raise RuntimeError("PostgreSQL's exact search disagrees with the folder store's")
        recall.append(len({r.id for r in truth} & {r.id for r in close}) / 10)
    return {**{f"{k} p50 ms": _ms(t) for k, t in times.items()}, "hnsw recall@10": round(float(np.mean(recall)), 4)}


def search_http(indexes: dict[str, str], texts: list[str]) -> dict:
    """Text queries through one service at a time (two services side by side on 2 cores slow each other:
    the idle one's threads still spin after each answer), in the order A B B A, so that drift in the
    machine's load falls on both alike."""
    times = {name: [] for name in indexes}
    half = (len(texts) - 5) // 2
    for name, part in [(n, 0) for n in indexes] + [(n, 1) for n in reversed(list(indexes))]:
        process, base = start_child(indexes[name])
        try:
            http = client(base)
            for text in texts[:5]:  # warm-up
                http.post("/api/search", json={"query": text, "top_k": 10})
            for text in texts[5 + part * half:5 + (part + 1) * half]:
                start = time.perf_counter()
                response = http.post("/api/search", json={"query": text, "top_k": 10})
                times[name].append(time.perf_counter() - start)
                if response.status_code != 200 or len(response.json()["results"]) != 10:
                    raise RuntimeError(f"{name} answered {response.status_code}: {response.text[:200]}")
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {f"{name} http p50 ms": _ms(t) for name, t in times.items()} | {
        f"{name} http p90 ms": round(1000 * percentile(t, 0.9), 2) for name, t in times.items()}


def _photos(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    shapes = ShapesDataset(count, seed=seed, image_size=224)
    for i in range(count):
        shapes.image(i).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _index(source: Path, index: str, model: Path, threads: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clipforge", "index", str(source), "--model", str(model),
                             "--index", index, "--no-progress", "--approximate", "never", "--threads", str(threads),
                             "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(runs: list[subprocess.Popen]) -> None:
    for run in runs:
        out, err = run.communicate(timeout=1800)
        if run.returncode != 0:
            raise RuntimeError(f"clipforge index failed: {err[-2000:]}")


def indexing(tmp: Path, server: LocalPostgres, model: Path, images: int) -> dict:
    half = [_photos(tmp / f"writer{i}", images // 2, seed=10 + i) for i in range(2)]
    both = tmp / "both"
    both.mkdir()
    for i, folder in enumerate(half):
        (both / folder.name).symlink_to(folder)
    figures = {}
    start = time.perf_counter()
    _wait([_index(both, str(tmp / "folder-index"), model, 2)])
    figures["folder, 1 writer images/s"] = round(images / (time.perf_counter() - start), 1)
    start = time.perf_counter()
    _wait([_index(both, server.url("one_writer"), model, 2)])
    figures["postgres, 1 writer images/s"] = round(images / (time.perf_counter() - start), 1)
    start = time.perf_counter()
    _wait([_index(folder, server.url("two_writers"), model, 1) for folder in half])  # the same two cores
    figures["postgres, 2 writers images/s"] = round(images / (time.perf_counter() - start), 1)
    with Index.open(server.url("two_writers")) as index:
        paths = [index.item(i).path for i in index.ids()]
    figures["2 writers: every image once"] = sorted(paths) == sorted(
        str(p) for folder in half for p in folder.iterdir())
    return figures


def run(items: int, n_queries: int, images: int, clusters: int = 1000) -> dict:
    texts = queries(n_queries + 5)
    server = LocalPostgres(settings={"shared_buffers": "1GB"})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            folder_dir = build_index(tmp, items, clusters=clusters)
            built = {"folder index built s": round(time.perf_counter() - start, 1)}
            url = server.url("bench")
            start = time.perf_counter()
            Index.copy(folder_dir, url, approximate="never", progress=False).close()
            built["copy to postgres s"] = round(time.perf_counter() - start, 1)
            start = time.perf_counter()
            Index.copy(folder_dir, url, approximate="always", progress=False).close()  # nothing left to copy
            built["hnsw build + tuning s"] = round(time.perf_counter() - start, 1)
            folder = Index.open(folder_dir, float32_mib=DEFAULT_FLOAT32_MIB)
            pg = Index.open(url)
            built["hnsw"] = pg.config["approximate"]
            # queries like the data (normalised midpoints of stored pairs, another seed than the tuning's): the
            # random-weight model's text vectors lie outside the synthetic clusters and measure nothing
            stored = folder.vectors(folder.ids()[np.random.default_rng(7).choice(len(folder), 2 * n_queries)])
            vectors = sample_queries(stored, n_queries, seed=7)
            library = search_library(folder, pg, vectors)
            folder.close()
            pg.close()
            http = search_http({"folder": folder_dir, "postgres": url}, texts)
            http["postgres hnsw / folder http p50"] = round(http["postgres http p50 ms"] / http["folder http p50 ms"], 3)
            writers = indexing(tmp, server, tmp / "model", images)
            return {"items": items, "clusters": clusters, "queries": n_queries, "model": "ViT-B/32 (random weights)",
                    **built, **library,
                    **http, **writers}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--images", type=int, default=384, help="images indexed by the writer comparison")
    parser.add_argument("--clusters", type=int, default=1000, help="centres the synthetic vectors gather around")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    env = environment("cpu")
    print(json.dumps({k: env[k] for k in ("cpu", "cpu_flags", "cores", "torch", "threads")}, indent=2))
    figures = run(args.items, args.queries, args.images, args.clusters)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
