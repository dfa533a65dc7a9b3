"""Shared benchmark helpers: environment report, interleaved timing, matmul peak, FLOP counting, tables.

Every benchmark times clipforge and the reference libraries (OpenCLIP, Hugging Face transformers)
in one process on the same weights and inputs; timings are interleaved round by round so that load
from other processes hits every implementation alike, and ratios from one run are the figures to
trust on a shared machine.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing clipforge
    sys.path.insert(0, str(ROOT / "src"))
    # and so do the child processes some benchmarks start (bench_loss measures memory in children)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCES = ("open_clip", "transformers")


def optional_import(name: str):
    """The module, or None when it (or one of its own imports, e.g. torchvision) is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def environment(device: str) -> dict[str, Any]:
    """What the figures were measured on: versions, threads, processor or GPU, current load."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "threads": torch.get_num_threads(), "cpu": _cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count()}
    if isa_cap():
        env["isa_cap"] = isa_cap()  # bench/capped.py: the libraries' kernels limited to an older instruction set
        env["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    if hasattr(os, "getloadavg"):
        env["load_avg_1min"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    for name in ("clipforge", "open_clip", "transformers", "onnxruntime"):
        module = optional_import(name)
        env[name] = getattr(module, "__version__", "?") if module else None
    return env


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def isa_cap() -> str | None:
    """The instruction set ``bench/capped.py`` limited the libraries to in this process, if it did."""
    return os.environ.get("CLIPFORGE_BENCH_ISA_CAP") or None


def cpu_flags() -> list[str]:
    """The processor's vector-instruction flags that decide kernel speed (AVX2 only, AVX-512, VNNI, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in SIMD_FLAGS if f in present]
    except OSError:
        pass
    return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn ``repeats`` times after warm-up."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32,
                       sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5) -> float:
    """This machine's dense matmul throughput in GFLOP/s: best of several square products."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            synchronize(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention) as counted by ``FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def row(bench: str, case: str, impl: str, seconds: float, items: int, unit: str,
        flops_per_item: float | None = None, peak_gflops: float | None = None, **extra: Any) -> dict[str, Any]:
    """One measured figure: throughput in ``unit`` and, given FLOPs and a peak, its fraction of the peak."""
    throughput = items / seconds
    out = {"bench": bench, "case": case, "impl": impl, "value": throughput, "unit": unit, "seconds": seconds}
    if flops_per_item and peak_gflops:
        out["gflops"] = throughput * flops_per_item / 1e9
        out["frac_peak"] = out["gflops"] / peak_gflops
    out.update(extra)
    return out


def add_ratios(rows: list[dict[str, Any]], ours_prefix: str = "clipforge") -> list[dict[str, Any]]:
    """Give each clipforge row ``vs_<reference>``: its throughput over the reference's in the same case.

    Only references measured somewhere in the row's benchmark get a column; a case where that
    reference has no equivalent (a ResNet in transformers) reads n/a.
    """
    refs = {(r["bench"], r["case"], r["impl"]): r["value"] for r in rows if not r["impl"].startswith(ours_prefix)}
    present = {(bench, impl) for bench, _, impl in refs}
    for r in rows:
        if not r["impl"].startswith(ours_prefix):
            continue
        for ref in (ref for ref in REFERENCES if (r["bench"], ref) in present):
            base = refs.get((r["bench"], r["case"], ref))
            r[f"vs_{ref}"] = r["value"] / base if base else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the rows: figure, fraction of peak, ratios, output check."""
    header = ["bench", "case", "impl", "throughput", "% peak", "vs open_clip", "vs transformers", "check"]
    lines = [header]
    for r in rows:
        lines.append([
            r["bench"], r["case"], r["impl"],
            f"{r['value']:.4g} {r['unit']}" if r.get("value") is not None else "n/a",
            f"{100 * r['frac_peak']:.1f}%" if r.get("frac_peak") is not None else "",
            _ratio(r, "vs_open_clip"), _ratio(r, "vs_transformers"), r.get("check", ""),
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def report(rows: list[dict[str, Any]], json_path: str | None) -> None:
    """Print the rows as a table and, given a path, write them there as JSON."""
    print(format_table(rows))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))


def _ratio(r: dict[str, Any], key: str) -> str:
    if key not in r:
        return ""
    return "n/a" if r[key] is None else f"{r[key]:.2f}x"


def compare_outputs(ours: torch.Tensor, theirs: torch.Tensor, rtol: float) -> tuple[float, str]:
    """Largest difference relative to the largest magnitude, and 'ok' / 'DIFF' against ``rtol``."""
    ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
    rel = ((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12)).item()
    return rel, ("ok" if rel <= rtol else "DIFF") + f" {rel:.1e}"
