"""Search benchmarks: indexing throughput against a plain OpenCLIP loop, and top-10 latency over many vectors.

``index``: JPEG photos of mixed sizes (long side 256 to 4000 px, or ``--sides MIN MAX``), ViT-B/32 on the CPU with the same
(random) weights in both libraries, the same DataLoader workers and batch size; ``clipforge index`` (exact
OpenAI preprocessing, hashing, SQLite, fsync included; fp32, and ``--precision int8``) against OpenCLIP's
fp32 model and preprocessing in a plain loop, each also with ``--fast-decode`` (JPEG draft decoding); the
variants' top-10 overlap with the exact fp32 index.
``vectors``: a synthetic index of clustered unit vectors (d = 512): exact top-10 latency for 1 and 16
queries, the process's resident memory, and the approximate index's recall@10 and speed-up.
Usage: ``PYTHONPATH=src python bench/bench_search.py [--parts index vectors] [--quick] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import environment, optional_import  # noqa: E402

from clipforge.io.factory import create_model, save  # noqa: E402
from clipforge.search import Index  # noqa: E402
from clipforge.search import store  # noqa: E402


def write_photos(folder: Path, count: int, seed: int = 0, sides: tuple[int, int] = (256, 4000)) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields plus grain) with long sides log-uniform in ``sides`` px."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        long_side = int(np.exp(rng.uniform(np.log(sides[0]), np.log(sides[1]))))
        short_side = int(long_side * rng.uniform(0.56, 0.8))
        w, h = (long_side, short_side) if i % 3 else (short_side, long_side)
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        grain = rng.integers(-12, 12, (h, w, 1), dtype=np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
        paths.append(folder / f"photo{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def open_clip_loop(model_dir: Path, paths: list[Path], workers: int, batch_size: int) -> float:
    """Seconds for a plain OpenCLIP indexing loop: its model (our weights, strict) and preprocessing."""
    open_clip = optional_import("open_clip")
    from safetensors.torch import load_file
    start = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=True)
    model.eval()

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return preprocess(Image.open(paths[i]).convert("RGB"))

    vectors = []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(Files(), batch_size=batch_size, num_workers=workers):
            vectors.append(torch.nn.functional.normalize(model.encode_image(batch), dim=-1))
    return time.perf_counter() - start


def clipforge_index(model_dir: Path, photos: Path, out: Path, workers: int, batch_size: int,
                    fast_decode: bool, precision: str = "fp32") -> tuple[float, Index]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    index = Index.build(out, [photos], model=str(model_dir), device="cpu", workers=workers, batch_size=batch_size,
                        progress=False, fast_decode=fast_decode, approximate="never", precision=precision)
    return time.perf_counter() - start, index


def top10_overlap(exact: Index, other: Index) -> float:
    """Mean share of each exact top-10 ("more like this" on every item, by path) that ``other`` also returns."""
    queries = exact.vectors(exact.ids())
    path = {index: {int(i): index.item(int(i)).path for i in index.ids()} for index in (exact, other)}
    a, _ = exact.search_batch(queries, 10)
    b, _ = other.search_batch(queries, 10)
    return float(np.mean([len({path[exact][i] for i in x} & {path[other][i] for i in y}) / 10
                          for x, y in zip(a, b)]))


def bench_index(count: int, workers: int, batch_size: int, rounds: int,
                sides: tuple[int, int] = (256, 4000)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_photos(tmp / "photos", count, sides=sides)
        torch.manual_seed(0)
        model_dir = save(create_model("ViT-B-32"), tmp / "vit-b-32")
        for p in paths:  # same page cache for everyone
            p.read_bytes()
        variants = {"clipforge": ("exact", False, "fp32"), "clipforge --fast-decode": ("fast", True, "fp32"),
                    "clipforge --precision int8": ("int8", False, "int8"),
                    "clipforge --precision int8 --fast-decode": ("int8-fast", True, "int8")}
        times = {name: [] for name in [*variants, "open_clip"]}
        for _ in range(rounds):
            for name, (folder, fast, precision) in variants.items():
                times[name].append(clipforge_index(model_dir, tmp / "photos", tmp / folder, workers, batch_size,
                                                   fast, precision)[0])
            if optional_import("open_clip") is not None:
                times["open_clip"].append(open_clip_loop(model_dir, paths, workers, batch_size))
        overlaps = {name: top10_overlap(Index.open(tmp / "exact"), Index.open(tmp / folder))
                    for name, (folder, _, _) in variants.items() if folder != "exact"}
        reference = statistics.median(times["open_clip"]) if times["open_clip"] else None
        for impl, ts in times.items():
            if ts:
                seconds = statistics.median(ts)
                rows.append({"bench": "index", "impl": impl, "images": count, "long_sides_px": list(sides),
                             "seconds": round(seconds, 2),
                             "rounds_s": [round(t, 2) for t in ts],
                             "images_per_s": round(count / seconds, 2),
                             "vs_open_clip": round(reference / seconds, 2) if reference else None,
                             **({"top10_overlap_with_exact": round(overlaps[impl], 4)} if impl in overlaps else {})})
    return rows


def synthetic_index(folder: Path, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """An index of ``n`` clustered unit vectors written through clipforge's own store; returns 16 queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    writer = store.SegmentWriter(folder, "images", dim)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, 100_000):
        count = min(100_000, n - start)
        x = centres[rng.integers(0, 256, count)] + 0.7 * rng.standard_normal((count, dim), dtype=np.float32)
        writer.write(start, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    writer.close()
    store.write_config(folder, {"format_version": store.FORMAT_VERSION, "segment_rows": store.SEGMENT_ROWS,
                                "model": "synthetic", "weights_sha256": "", "dim": dim, "preprocess": {}})
    with store.connect(folder) as db:
        db.executemany("INSERT INTO items (id, source, path, size, mtime_ns, hash, width, height, row) "
                       "VALUES (?, 'synthetic', ?, 0, 0, '', 0, 0, ?)",
                       ((i + 1, f"/synthetic/{i:07d}.jpg", i) for i in range(n)))
        db.execute("INSERT OR REPLACE INTO rows VALUES ('images', ?)", (n,))
    q = centres[rng.integers(0, 256, 16)] + 0.7 * rng.standard_normal((16, dim), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _memory() -> dict[str, float]:
    """Resident memory (MiB): total, anonymous (the process's own) and file-backed (mapped vectors)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _latencies(fn, repeats: int) -> dict[str, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"p50_ms": round(1000 * times[len(times) // 2], 1),
            "p99_ms": round(1000 * times[min(len(times) - 1, int(0.99 * len(times)))], 1)}


def bench_vectors(n: int, dim: int, repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        queries = synthetic_index(folder, n, dim)
        before = _memory()
        index = Index.open(folder)
        one = _latencies(lambda: index.search(queries[0], top_k=10), repeats)
        sixteen = _latencies(lambda: index.search_batch(queries, 10), max(3, repeats // 2))
        after = _memory()
        rows.append({"bench": "exact", "impl": "clipforge", "vectors": n, "dim": dim, "1 query": one,
                     "16 queries": sixteen, "memory_before_open_MiB": before, "memory_after_MiB": after})
        if optional_import("faiss") is not None:
            from clipforge.search import approximate
            start = time.perf_counter()
            info = approximate.refresh(folder, "always")
            built = time.perf_counter() - start
            index.refresh()
            fast = _latencies(lambda: index.search(queries[0], top_k=10, approximate=True), repeats * 5)
            exact_ids, _ = index.search_batch(queries, 10)
            approx_ids, _ = index.search_batch(queries, 10, approximate=True)
            overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, approx_ids)])
            rows.append({"bench": "approximate", "impl": "clipforge (faiss IVFFlat)", "vectors": n,
                         "build_s": round(built, 1), "recall@10_recorded": info["recall@10"],
                         "recall@10_on_16_held_out_queries": round(float(overlap), 4), "nprobe": info["nprobe"],
                         "cells": info["cells"], "1 query": fast,
                         "speed_up_vs_exact_p50": round(one["p50_ms"] / max(fast["p50_ms"], 1e-3), 1)})
        index.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["index", "vectors"], default=["index", "vectors"])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 cores")
    parser.add_argument("--images", type=int, help="photos to index (default 48; quick 12)")
    parser.add_argument("--vectors", type=int, help="vectors to search (default 1,000,000; quick 100,000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sides", type=int, nargs=2, default=[256, 4000], metavar=("MIN", "MAX"),
                        help="the photos' long sides, log-uniform in this range of pixels (default 256 4000)")
    parser.add_argument("--rounds", type=int, help="indexing rounds of each implementation, median (default 3; quick 1)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    print(json.dumps(environment("cpu")))
    rows = []
    if "index" in args.parts:
        rows += bench_index(args.images or (12 if args.quick else 48), args.workers, 16,
                            args.rounds or (1 if args.quick else 3), tuple(args.sides))
    if "vectors" in args.parts:
        rows += bench_vectors(args.vectors or (100_000 if args.quick else 1_000_000), 512, 5 if args.quick else 20)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
