"""The compressed approximate index (``clipforge index --approximate ivfpq``) over millions of synthetic vectors.

A folder index of ``--items`` synthetic unit vectors of dimension 512 is written in clipforge's own format
(float16 segments, a metadata row per item), one 65,536-vector segment at a time, so the vectors are never all in
RAM. They are clustered, as embeddings of real images are (by subject, with near-duplicates), rather than uniform:
a mixture of ``--clusters`` (default one per 1,000 items) Gaussian clusters whose centres and spreads both follow an
anisotropic Gaussian, the i-th of 512 principal directions with variance proportional to 1/i (randomly rotated),
the spread ``--spread`` (0.5) times the centres' scale; then normalised. The benchmark prints how close each query's
1st and 10th neighbours are. (``--clusters 0`` leaves the anisotropic Gaussian alone, and ``--spectrum 0`` makes it
uniform on the sphere: uniformly random unit vectors have no neighbourhood structure, their top 10 barely closer
than the rest, and no index finds them without scanning most of the collection.)

Then, each in a process of its own: the IVF-PQ build (``approximate.refresh``, what ``clipforge index`` runs
after indexing), timed, with its peak resident memory; and a serving process (``Index.open`` and
``Index.search`` of one query vector at a time, faiss and torch on ``--threads`` threads), its resident memory
after the queries, and search latency with the index's files evicted from the page cache first (cold) and again
(warm), then warm at a half, a quarter and an eighth of the tuned nprobe. Queries are held-out vectors from the
same distribution; recall@10 is measured against exact search (in chunks, here) on the serving process's answers,
beside the recall the build recorded on its own sampled queries.
The disk needs about 1.2 KB a vector (float16 vectors, SQLite metadata, the index); the benchmark checks first and
shrinks ``--items`` to what fits, saying so.

Usage: ``python bench/bench_ivfpq.py [--items 10000000] [--where /tmp] [--max-index-memory 4GB] [--queries 100]
[--json out.json]``; ``--keep DIR`` keeps (and reuses) the generated index there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import environment  # noqa: E402

from clipforge.search import store  # noqa: E402

DIM = 512
BYTES_PER_ITEM = DIM * 2 + 120 + 160  # float16 vector, SQLite row, IVF-PQ code and id (PQ64) with its partitions


class Distribution:
    """The synthetic vectors' distribution: ``clusters`` Gaussian clusters (none: one centred Gaussian) whose
    centres and spreads have variance ~ i^-``spectrum`` along the i-th of DIM randomly rotated directions."""

    def __init__(self, clusters: int, spread: float, spectrum: float, seed: int = 0):
        rng = np.random.default_rng([seed, 0])
        self.rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
        self.scale = np.arange(1, DIM + 1, dtype=np.float32) ** (-spectrum / 2)
        self.spread = spread if clusters else 1.0
        self.centres = self._gaussian(rng, clusters) if clusters else None

    def _gaussian(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return (rng.standard_normal((count, DIM), dtype=np.float32) * self.scale) @ self.rotation

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        x = self.spread * self._gaussian(rng, count)
        if self.centres is not None:
            x += self.centres[rng.integers(0, len(self.centres), count)]
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(folder: Path, items: int, distribution: Distribution, seed: int = 0) -> None:
    """A folder index of ``items`` synthetic unit vectors, one segment at a time, committed as the indexer does
    (vectors flushed first, then the rows that point at them)."""
    folder.mkdir(parents=True)
    store.write_config(folder, {"format_version": store.FORMAT_VERSION, "segment_rows": store.SEGMENT_ROWS,
                                "model": "synthetic", "weights_sha256": "", "dim": DIM, "preprocess": {}})
    writer = store.SegmentWriter(folder, "images", DIM)
    db = store.connect(folder)
    for start in range(0, items, store.SEGMENT_ROWS):
        count = min(store.SEGMENT_ROWS, items - start)
        writer.write(start, distribution.sample(np.random.default_rng([seed, 1, start]), count).astype(np.float16))
        with db:
            db.executemany("INSERT INTO items (id, source, path, key, size, mtime_ns, hash, width, height, row) "
                           "VALUES (?, 'synthetic', '/synthetic', ?, 0, 0, '', 0, 0, ?)",
                           ((i + 1, str(i), i) for i in range(start, start + count)))
            db.execute("INSERT OR REPLACE INTO rows VALUES ('images', ?)", (start + count,))
        if start // store.SEGMENT_ROWS % 16 == 15:
            print(f"  generated {start + count:,} of {items:,} vectors", file=sys.stderr, flush=True)
    writer.close()
    db.close()


def queries(count: int, distribution: Distribution, seed: int = 0) -> np.ndarray:
    """Held-out query vectors from the index's distribution (a stream of its own)."""
    return distribution.sample(np.random.default_rng([seed, 2]), count)


def _memory() -> dict[str, int]:
    """This process's resident memory in KiB: VmRSS, RssAnon (its own), RssFile (mapped files), VmHWM (peak)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


class _PeakMemory:
    """The largest RssAnon and RssFile seen, sampled every 0.2 s in a thread (the kernel keeps only VmHWM)."""

    def __enter__(self):
        self.peak, self._stop = {"RssAnon": 0, "RssFile": 0}, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.2):
            now = _memory()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def stage_build(folder: Path, max_index_memory: int | None) -> dict:
    """Build the IVF-PQ index as ``clipforge index --approximate ivfpq`` does after indexing."""
    from clipforge.search import approximate
    approximate.refresh(folder, "never")  # a kept index's earlier build is dropped, so this one builds anew
    with _PeakMemory() as peak:
        start = time.perf_counter()
        info = approximate.refresh(folder, "ivfpq", max_index_memory)
        seconds = time.perf_counter() - start
    return {"build_s": round(seconds, 1), "info": info, "line": approximate.describe(info),
            "peak_rss_anon_MiB": round(peak.peak["RssAnon"] / 1024),
            "peak_rss_file_MiB": round(peak.peak["RssFile"] / 1024), "VmHWM_MiB": round(_memory()["VmHWM"] / 1024)}


def _evict(folder: Path) -> None:
    """Drop this index's files (only those) from the page cache, so that the next reads come from the disk."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def stage_serve(folder: Path, query_file: Path, threads: int) -> dict:
    """Open the index and answer one query vector at a time, as a service does: latency cold (the index's files
    evicted from the page cache) and warm, and the process's memory."""
    import faiss
    import torch

    from clipforge.search import Index
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    vectors = np.load(query_file)
    base = _memory()
    _evict(folder)
    start = time.perf_counter()
    index = Index.open(folder)
    opened = time.perf_counter() - start
    after_open = _memory()
    rounds, found = {}, None
    for name in ("cold", "warm"):
        times, ids = [], []
        for q in vectors:
            start = time.perf_counter()
            results = index.search(q, top_k=10)
            times.append(time.perf_counter() - start)
            ids.append([r.id for r in results])
        rounds[name] = times
        found = ids
    after = _memory()
    # the trade-off below the tuned nprobe: warm latency and the answers at a half, a quarter and an eighth of it
    searcher = index.store._approximate[0]
    tuned, sweep = searcher.nprobe, []
    for fraction in (2, 4, 8):
        searcher.nprobe = max(1, tuned // fraction)
        times, ids = [], []
        for q in vectors:
            start = time.perf_counter()
            ids.append([r.id for r in index.search(q, top_k=10)])
            times.append(time.perf_counter() - start)
        sweep.append({"nprobe": searcher.nprobe, "warm_p50_ms": round(1000 * sorted(times)[len(times) // 2], 2),
                      "found": ids})
    index.close()
    ms = {f"{name}_{p}_ms": round(1000 * sorted(t)[min(len(t) - 1, int(q * len(t)))], 2)
          for name, t in rounds.items() for p, q in (("p50", 0.5), ("p99", 0.99))}
    return {"open_s": round(opened, 1), **ms, "found": found, "sweep": sweep,
            "rss_before_open_MiB": round(base["VmRSS"] / 1024),
            "rss_after_open_MiB": round(after_open["VmRSS"] / 1024),
            "rss_after_queries_MiB": round(after["VmRSS"] / 1024),
            "rss_anon_after_queries_MiB": round(after["RssAnon"] / 1024),
            "rss_file_after_queries_MiB": round(after["RssFile"] / 1024),
            "VmHWM_MiB": round(after["VmHWM"] / 1024)}


def exact_recall(folder: Path, vectors: np.ndarray, found: list[list[int]]) -> tuple[float, float, float]:
    """(recall@10 of ``found`` (item ids) against exact search over every stored vector, computed in chunks; the
    mean cosine of the queries' nearest and 10th-nearest stored vectors)."""
    from clipforge.search import ivfpq
    with store.connect(folder) as db:
        ids, rows = np.ascontiguousarray(store.int_columns(db, "SELECT id, row FROM items ORDER BY id").T)
        segments = store.open_segments(folder, "images", store.next_row(db, "images"))
    top = ivfpq.exact_top(segments, rows, vectors.astype(np.float32), 10)
    truth = ids[top]
    cosines = np.einsum("qkd,qd->qk", store.gather(segments, rows[top.ravel()]).reshape(*top.shape, DIM), vectors)
    recall = float(np.mean([len(set(t.tolist()) & set(f)) / 10 for t, f in zip(truth, found)]))
    return recall, float(cosines[:, 0].mean()), float(cosines[:, -1].mean())


def _child(stage: str, **kwargs) -> dict:
    """Run ``stage`` in a fresh Python process (its own memory), returning what it printed last as JSON."""
    command = [sys.executable, __file__, "--stage", stage, "--stage-args", json.dumps(kwargs)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fitting_items(where: Path, items: int) -> int:
    """``items``, or as many whole segments as the free disk at ``where`` holds with 10% to spare."""
    free = shutil.disk_usage(where).free
    if items * BYTES_PER_ITEM * 1.1 <= free:
        return items
    fit = int(free / 1.1 / BYTES_PER_ITEM) // store.SEGMENT_ROWS * store.SEGMENT_ROWS
    print(f"note: {where} has {free / 2**30:.0f} GiB free, too little for {items:,} vectors "
          f"({items * BYTES_PER_ITEM * 1.1 / 2**30:.0f} GiB); running {fit:,}", flush=True)
    return fit


def _recipe(items: int, clusters: int | None, spread: float, spectrum: float) -> dict:
    return {"items": items, "clusters": max(1, items // 1000) if clusters is None else clusters, "spread": spread,
            "spectrum": spectrum}


def run(items: int, where: Path, max_index_memory: str | None, n_queries: int, threads: int, clusters: int | None,
        spread: float, spectrum: float, keep: Path | None = None) -> dict:
    from clipforge.search.ivfpq import parse_size
    limit = parse_size(max_index_memory) if max_index_memory else None
    tmp = Path(tempfile.mkdtemp(prefix="clipforge-ivfpq-", dir=where)) if keep is None else keep.parent
    folder = keep or tmp / "index"
    try:
        recipe = _recipe(items, clusters, spread, spectrum)
        config = store.read_config(folder) if folder.exists() else None
        if config is None or config.get("synthetic") != recipe:
            shutil.rmtree(folder, ignore_errors=True)
            recipe = _recipe(fitting_items(where, items), clusters, spread, spectrum)
            start = time.perf_counter()
            generate(folder, recipe["items"], Distribution(recipe["clusters"], spread, spectrum))
            store.write_config(folder, {**store.read_config(folder), "synthetic": recipe})
            print(f"generated {recipe['items']:,} vectors in {time.perf_counter() - start:.0f} s", flush=True)
        distribution = Distribution(recipe["clusters"], spread, spectrum)
        built = _child("build", folder=str(folder), max_index_memory=limit)
        print(built["line"], f"(built in {built['build_s']:.0f} s)", flush=True)
        query_file = tmp / "queries.npy"
        vectors = queries(n_queries, distribution)
        np.save(query_file, vectors)
        served = _child("serve", folder=str(folder), query_file=str(query_file), threads=threads)
        recall, first, tenth = exact_recall(folder, vectors, served.pop("found"))
        for point in served["sweep"]:
            point["recall@10"] = round(exact_recall(folder, vectors, point.pop("found"))[0], 4)
        disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {**recipe, "dim": DIM, "threads": threads, "queries": n_queries, "max_index_memory": max_index_memory,
            "folder_GiB": round(disk / 2**30, 2), "build": built, "serve": served,
            "recall@10_held_out_queries": round(recall, 4), "query_cosine_1st": round(first, 3),
            "query_cosine_10th": round(tenth, 3)}


def report(figures: dict) -> None:
    built, served, info = figures["build"], figures["serve"], figures["build"]["info"]
    print(f"\nIVF-PQ over {figures['items']:,} synthetic unit vectors (d = {DIM}; {figures['clusters']:,} clusters, "
          f"spread {figures['spread']}, spectrum i^-{figures['spectrum']}; a query's 1st and 10th neighbours at cosine "
          f"{figures['query_cosine_1st']:.2f} and {figures['query_cosine_10th']:.2f}), {figures['threads']} threads:")
    print(f"  {built['line']}")
    print(f"  build: {built['build_s']:.0f} s; peak memory {built['peak_rss_anon_MiB']:,} MiB own + "
          f"{built['peak_rss_file_MiB']:,} MiB of mapped vectors (VmHWM {built['VmHWM_MiB']:,} MiB)")
    print(f"  serving process: {served['rss_after_queries_MiB']:,} MiB resident after {figures['queries']} queries "
          f"({served['rss_anon_after_queries_MiB']:,} own + {served['rss_file_after_queries_MiB']:,} mapped files; "
          f"{served['rss_before_open_MiB']:,} before opening the index; opened in {served['open_s']} s)")
    print(f"  one query, top 10: cold p50 {served['cold_p50_ms']} ms (p99 {served['cold_p99_ms']}), warm p50 "
          f"{served['warm_p50_ms']} ms (p99 {served['warm_p99_ms']})")
    print(f"  recall@10 after re-ranking, against exact search: {figures['recall@10_held_out_queries']:.3f} on "
          f"{figures['queries']} held-out queries ({info['recall@10']:.3f} recorded by the build on "
          f"{info['recall_queries']} sampled queries)")
    for point in served["sweep"]:
        print(f"  at nprobe {point['nprobe']}: warm p50 {point['warm_p50_ms']} ms, recall@10 {point['recall@10']:.3f} "
              f"on the held-out queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--where", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to write the index (default: the temporary folder)")
    parser.add_argument("--max-index-memory", help="the build's limit, e.g. 4GB (default: none)")
    parser.add_argument("--queries", type=int, default=100, help="held-out queries timed and scored (default 100)")
    parser.add_argument("--threads", type=int, default=2, help="the serving process's threads (default 2)")
    parser.add_argument("--clusters", type=int, help="Gaussian clusters (default: one per 1,000 items; 0: none)")
    parser.add_argument("--spread", type=float, default=0.5, help="a cluster's spread over its centre's (default 0.5)")
    parser.add_argument("--spectrum", type=float, default=1.0,
                        help="variance of the i-th principal direction ~ i^-SPECTRUM (default 1; 0: isotropic)")
    parser.add_argument("--keep", type=Path, help="keep the generated index in this folder, and reuse it next time")
    parser.add_argument("--json", help="write the figures and the environment here")
    parser.add_argument("--stage", choices=["build", "serve"], help=argparse.SUPPRESS)
    parser.add_argument("--stage-args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        kwargs = json.loads(args.stage_args)
        kwargs["folder"] = Path(kwargs["folder"])
        if args.stage == "serve":
            kwargs["query_file"] = Path(kwargs["query_file"])
        print(json.dumps((stage_build if args.stage == "build" else stage_serve)(**kwargs)))
        return
    env = environment("cpu")
    print(f"CPU: {env['cpu']}, {env['cores']} cores, flags {' '.join(env['cpu_flags'])}; "
          f"disk free at {args.where}: {shutil.disk_usage(args.where).free / 2**30:.0f} GiB", flush=True)
    figures = run(args.items, args.where, args.max_index_memory, args.queries, args.threads, args.clusters,
                  args.spread, args.spectrum, args.keep)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "environment": env}, indent=2))


if __name__ == "__main__":
    main()
