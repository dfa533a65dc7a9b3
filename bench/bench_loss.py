"""Contrastive loss forward + backward: clipforge tiled vs clipforge plain vs OpenCLIP's ``ClipLoss``.

Each case runs in a fresh child process, which reports the growth of its peak RSS over the memory it
held once the features existed (so grads, logits and scratch buffers, not the features themselves)
and the forward + backward time. Cases that cannot fit in RAM are reported, not run.
Run with the reference environment, which has open_clip:
    PYTHONPATH=src /work/refenv/venv/bin/python bench/bench_loss.py [--sizes 4096 16384 65536]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLEMENTATIONS = ("clipforge-tiled", "clipforge-plain", "openclip-ClipLoss")
PLAIN_BYTES_PER_PAIR = 16  # logits, their log-softmax both ways and grads: ~4 fp32 N x N matrices
_RAM_FRACTION = 0.75  # run a case only if its estimated need fits in this share of physical RAM


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not ``getrusage``'s ru_maxrss: on Linux that keeps the high-water
    mark of the parent's memory image from before ``exec``, so a child of a large process reports the
    parent's size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _make_features(n: int, dim: int):
    """Two (n, dim) L2-normalised, grad-requiring fp32 feature matrices, built without N x d temporaries."""
    import torch
    generator = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(2):
        x = torch.randn(n, dim, generator=generator)
        x.div_(x.norm(dim=1, keepdim=True))
        feats.append(x.requires_grad_())
    return feats


def _loss_fn(impl: str, tile_size: int):
    if impl.startswith("clipforge"):
        from clipforge.loss import contrastive_loss
        tile = tile_size if impl == "clipforge-tiled" else None
        return lambda a, b, s: contrastive_loss(a, b, s, tile)
    import open_clip
    return open_clip.loss.ClipLoss()


def _child(impl: str, n: int, dim: int, tile_size: int, threads: int) -> dict:
    """One measurement in this (fresh) process: peak RSS growth and best time of forward + backward."""
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
    loss_fn = _loss_fn(impl, tile_size)
    warm = _make_features(64, dim)  # start thread pools and allocators before the baseline
    loss_fn(*warm, torch.tensor(10.0)).backward()
    images, texts = _make_features(n, dim)
    log_scale = torch.tensor(100.0).log().requires_grad_()
    baseline = _rss_bytes()
    times, loss = [], None
    while not times or (sum(times) < 2.0 and len(times) < 5):
        images.grad = texts.grad = log_scale.grad = None
        start = time.perf_counter()
        loss = loss_fn(images, texts, log_scale.exp())
        loss.backward()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = _peak_rss_bytes()
    return {"peak_mib": (peak - baseline) / 2**20, "time_s": min(times), "loss": loss.item(),
            "features_mib": 2 * n * dim * 4 / 2**20}


def _has_open_clip() -> bool:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return False
    return True


def _needs_bytes(impl: str, n: int, done: list[dict]) -> int | None:
    """Estimated extra memory: none for tiled, else bytes per pair measured earlier (or the formula)."""
    if impl == "clipforge-tiled":
        return None
    measured = [r for r in done if r["impl"] == impl and "peak_mib" in r]
    per_pair = measured[-1]["peak_mib"] * 2**20 / measured[-1]["n"] ** 2 if measured else PLAIN_BYTES_PER_PAIR
    return int(per_pair * n * n)


def _run_case(impl: str, n: int, dim: int, tile_size: int, threads: int, done: list[dict]) -> dict:
    row = {"impl": impl, "n": n, "dim": dim, "tile_size": tile_size if impl == "clipforge-tiled" else None,
           "threads": threads or None}
    if impl.startswith("openclip") and not _has_open_clip():
        return {**row, "status": "skipped (open_clip not installed)"}
    needs = _needs_bytes(impl, n, done)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needs is not None and needs > _RAM_FRACTION * ram:
        return {**row, "status": f"does not fit (needs {needs / 2**30:.0f} GiB, RAM {ram / 2**30:.0f} GiB)"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(n), str(dim), str(tile_size), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**row, "status": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return {**row, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def run(sizes=(4096, 16384, 65536), dim: int = 512, tile_size: int | None = None, threads: int = 0,
        implementations=IMPLEMENTATIONS) -> list[dict]:
    """Measure every implementation at every batch size, one child process per case.

    ``threads`` > 0 sets ``torch.set_num_threads`` in the children (0: torch's default).
    """
    from clipforge.loss import DEFAULT_TILE_SIZE
    tile_size = tile_size or DEFAULT_TILE_SIZE
    results: list[dict] = []
    for n in sizes:
        for impl in implementations:
            results.append(_run_case(impl, n, dim, tile_size, threads, results))
            print(_format(results[-1]), flush=True)
    return results


def _format(r: dict) -> str:
    head = f"N={r['n']:>6}  {r['impl']:<18}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    return (f"{head} peak +{r['peak_mib']:8.0f} MiB (features {r['features_mib']:.0f} MiB)  "
            f"time {r['time_s']:7.2f} s  loss {r['loss']:.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile-size", type=int, default=None, help="tile edge (default: DEFAULT_TILE_SIZE)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", nargs=5, metavar=("IMPL", "N", "DIM", "TILE", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, n, dim, tile, threads = args.child
        print(json.dumps(_child(impl, int(n), int(dim), int(tile), int(threads))))
        return 0
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, threads {args.threads or 'default'}; "
          "peak = growth of max RSS over the RSS once the features existed")
    results = run(tuple(args.sizes), args.dim, args.tile_size, args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
