"""``clipforge embed`` on its three engines, on the same images: throughput as ratios to the local engine.

Photo-like JPEGs (640x480, smooth colour fields and grain, about 30 KB each, as web-scale image sets hold them) are
embedded by ViT-B/32 (random weights, saved once, so that every process loads the same model) on the CPU with
each engine's defaults on this machine, each run a fresh command into a fresh folder:

- ``local``: one process (``--workers`` decoding processes beside torch's threads on every core);
- ``torchrun``: ``torchrun --nproc_per_node 2 -m clipforge embed`` (each rank its own partitions, one torch
  thread each, as torchrun sets OMP_NUM_THREADS);
- ``ray``: ``--engine ray`` on a local Ray instance the command starts (CPU decoding tasks, one encoder actor;
  on 2 cores, ``--ray-actors 2`` would leave no CPU for the decoding tasks, and the pipeline waits forever).

Each command is timed end to end; the same command run again, finding every partition complete, measures what it
spends besides embedding (interpreter, imports, model load, listing, Ray's start and stop), and throughput is also
given without it. Engines are interleaved round by round, so that load from other processes hits them alike, and
each engine's vectors are checked against the local engine's (largest difference; float16 rounding is 1e-3).
Usage: ``python bench/bench_embed_engines.py [--images 256] [--rounds 1] [--partition-size 32] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import ROOT, environment  # noqa: E402

from clipforge.io.factory import create_model, save  # noqa: E402

ENGINES = {"local": [], "torchrun": None, "ray": ["--engine", "ray"]}


def write_photos(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 12, (480, 640, 1), dtype=np.int16)
        Image.fromarray(np.clip(img + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def command(engine: str, photos: Path, model: Path, output: Path, partition_size: int, batch_size: int) -> list[str]:
    args = ["embed", str(photos), "--model", str(model), "--output", str(output), "--partition-size",
            str(partition_size), "--batch-size", str(batch_size), "--no-progress", "--json"]
    if engine == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "clipforge", *args]
    return [sys.executable, "-m", "clipforge", *args, *ENGINES[engine]]


def timed(argv: list[str], timeout: float) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # Ray's driver stops its local instance on the way out
            _, err = process.communicate(timeout=120)
            raise RuntimeError(f"{' '.join(argv)} took more than {timeout:.0f} s:\n{err[-3000:]}") from None
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return seconds


def vectors(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((folder / "img_emb").glob("*.npy"))]).astype(np.float32)


def run(images: int = 256, rounds: int = 1, partition_size: int = 32, batch_size: int = 32,
        engines: tuple[str, ...] = tuple(ENGINES), timeout: float = 1800) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_photos(tmp / "photos", images)
        torch.manual_seed(0)
        model = save(create_model("ViT-B-32"), tmp / "vit-b-32")
        times = {e: {"total": [], "again": []} for e in engines}
        for _ in range(rounds):
            for engine in engines:
                output = tmp / f"out-{engine.replace(', ', '-').replace(' ', '')}"
                shutil.rmtree(output, ignore_errors=True)
                argv = command(engine, tmp / "photos", model, output, partition_size, batch_size)
                times[engine]["total"].append(timed(argv, timeout))
                times[engine]["again"].append(timed(argv, timeout))  # every partition complete: the fixed costs
                print(f"  {engine}: {times[engine]['total'][-1]:.1f} s, again {times[engine]['again'][-1]:.1f} s",
                      file=sys.stderr, flush=True)
        reference = vectors(tmp / "out-local") if "local" in engines else None
        rows = []
        for engine in engines:
            total, again = statistics.median(times[engine]["total"]), statistics.median(times[engine]["again"])
            found = vectors(tmp / f"out-{engine.replace(', ', '-').replace(' ', '')}")
            rows.append({"engine": engine, "images": images, "seconds": round(total, 1),
                         "fixed_seconds": round(again, 1), "images_per_s": round(images / total, 2),
                         "images_per_s_embedding": round(images / max(total - again, 1e-9), 2),
                         "max_diff_vs_local": (float(np.abs(found - reference).max())
                                               if reference is not None and found.shape == reference.shape else None),
                         "rounds_s": [round(t, 1) for t in times[engine]["total"]]})
    local = next((r for r in rows if r["engine"] == "local"), None)
    for r in rows:
        if local:
            r["vs_local"] = round(r["images_per_s"] / local["images_per_s"], 2)
            r["vs_local_embedding"] = round(r["images_per_s_embedding"] / local["images_per_s_embedding"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds, median (default 1)")
    parser.add_argument("--partition-size", type=int, default=32, help="images a partition (default 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a command may take (default 1800)")
    parser.add_argument("--json", help="write the rows and the environment here")
    args = parser.parse_args()
    env = environment("cpu")
    print(f"CPU: {env['cpu']}, {env['cores']} cores, flags {' '.join(env['cpu_flags'])}; torch {env['torch']}",
          flush=True)
    rows = run(args.images, args.rounds, args.partition_size, args.batch_size, tuple(args.engines), args.timeout)
    print(f"\nclipforge embed, {args.images} JPEGs (640x480), ViT-B/32 fp32 on the CPU, batch {args.batch_size}, "
          f"partitions of {args.partition_size}:")
    print(f"  {'engine':<15}{'seconds':>9}{'fixed':>8}{'images/s':>10}{'vs local':>10}{'embedding only':>16}"
          f"{'vs local':>10}{'max diff':>10}")
    for r in rows:
        diff = f"{r['max_diff_vs_local']:.1e}" if r["max_diff_vs_local"] is not None else "n/a"
        print(f"  {r['engine']:<15}{r['seconds']:>9}{r['fixed_seconds']:>8}{r['images_per_s']:>10}"
              f"{r.get('vs_local', ''):>10}{r['images_per_s_embedding']:>16}{r.get('vs_local_embedding', ''):>10}"
              f"{diff:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "environment": env}, indent=2))


if __name__ == "__main__":
    main()
