"""Run every clipforge benchmark against the reference libraries and print one summary table.

Parts: ``encode`` (images/s and texts/s vs OpenCLIP and transformers), ``train`` (one training step vs
OpenCLIP), and, where their modules exist, ``tokenizer``, ``preprocess``, ``loss`` and ``int8`` (int8 CPU inference
vs clipforge's float32: speed, and its cost in quality on a trained model). Every figure
comes from one process on one machine, and each clipforge figure is printed with its ratio to the
references measured in the same run. ``--quick`` shrinks every part to a few minutes on 2 CPU cores;
``--gpu`` is the preset used by ``bench/gpu.sh`` (bf16, SDPA flash attention, ViT-B/32 and ViT-B/16).
Usage: ``python bench/run.py [--quick | --gpu] [--parts encode train ...] [--json results.json]``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import DTYPES, environment, format_table, matmul_peak_gflops  # noqa: E402

PARTS = ("encode", "train", "tokenizer", "preprocess", "loss", "int8")
REFERENCE_LIBRARIES = ("open_clip", "transformers")  # what the parts compare with; optional in the project venv
# Keyword arguments for the other benchmarks' run(); only those their signature accepts are passed.
OTHER_ARGS = {
    "tokenizer": {"full": {}, "quick": {"n_captions": 2000, "repeats": 2}},
    "preprocess": {"full": {}, "quick": {"repeats": 1}},
    "loss": {"full": {}, "quick": {"sizes": (4096, 16384), "repeats": 1}},
    "int8": {"full": {}, "quick": {"models": ("ViT-B-32",), "repeats": 3, "train_steps": 150}},
}


def presets(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Sizes of the encode and train parts for the chosen preset, with command-line overrides."""
    if args.gpu:
        encode = {"models": ("ViT-B-32", "ViT-B-16", "RN50"), "batch_sizes": (1, 64, 256), "dtypes": ("bf16",),
                  "repeats": 20, "onnx": False}
        train = {"models": ("ViT-B-32", "ViT-B-16"), "batch_size": 256, "precision": "bf16", "repeats": 10}
    else:
        encode = {"models": ("ViT-B-32", "RN50"), "batch_sizes": (1, 64), "dtypes": ("fp32",),
                  "repeats": 3 if args.quick else 7, "onnx": True}
        train = {"models": (str(_bench_file("train_step_config.json")),), "batch_size": 256, "precision": "fp32",
                 "repeats": 2 if args.quick else 4, "rounds": 1 if args.quick else 2}
    for key, value in (("models", args.models), ("batch_sizes", args.batch_sizes), ("dtypes", args.dtypes)):
        if value:
            encode[key] = tuple(value)
    if args.train_models:
        train["models"] = tuple(args.train_models)
    if args.train_batch_size:
        train["batch_size"] = args.train_batch_size
    if args.no_onnx:
        encode["onnx"] = False
    train["compile"] = args.compile
    return {"encode": encode, "train": train}


def _bench_file(name: str) -> Path:
    return Path(__file__).resolve().parent / name


def measure_peaks(device: str, dtypes: set[str]) -> dict[str, float]:
    """Matmul peak (GFLOP/s) per dtype; on a GPU larger products reach the tensor cores' rate."""
    sizes = (4096, 8192) if device.startswith("cuda") else (2048, 4096)
    peaks = {}
    for dtype in sorted(dtypes):
        if device == "cpu" and dtype != "fp32":
            continue  # low-precision CPU figures are indicative only; no peak fraction for them
        peaks[dtype] = matmul_peak_gflops(device, DTYPES[dtype], sizes)
    return peaks


def run_encode(cfg: dict[str, Any], device: str, peaks: dict[str, float]) -> list[dict[str, Any]]:
    import bench_encode
    return bench_encode.run(cfg["models"], cfg["batch_sizes"], cfg["dtypes"], device, cfg["repeats"],
                            cfg["onnx"], peaks)


def run_train(cfg: dict[str, Any], device: str, peaks: dict[str, float]) -> list[dict[str, Any]]:
    import bench_train_step
    rows = []
    for model in cfg["models"]:
        for compile in (False, True) if cfg["compile"] else (False,):
            rows += bench_train_step.run(model, cfg["batch_size"], device, cfg["repeats"], cfg["precision"],
                                         peaks.get(cfg["precision"]), compile)
        if device == "cpu" and cfg["precision"] == "fp32":
            rows += bench_train_step.run_own_processes(model, cfg["batch_size"], cfg["repeats"], cfg.get("rounds", 1),
                                                       peaks.get("fp32"))
    return rows


def run_other(part: str, quick: bool) -> Any:
    """The result of another helper's ``bench/bench_<part>.py``, or None when that file does not exist."""
    if not _bench_file(f"bench_{part}.py").exists():
        return None
    module = importlib.import_module(f"bench_{part}")
    accepted = inspect.signature(module.run).parameters
    kwargs = {k: v for k, v in OTHER_ARGS[part]["quick" if quick else "full"].items() if k in accepted}
    threads = torch.get_num_threads()
    try:
        return module.run(**kwargs)
    except ModuleNotFoundError as error:  # a part whose only reference is a library this venv lacks
        if error.name not in REFERENCE_LIBRARIES:
            raise
        print(f"note: {part}: {error.name} not importable, the part is skipped (its figures are ratios to it)")
        return None
    finally:
        torch.set_num_threads(threads)  # a part may pin its own thread count (preprocess uses one)


def _print_other(part: str, result: Any) -> None:
    print(f"\n== {part} ==")
    for item in result if isinstance(result, list) else [result]:
        if isinstance(item, dict):
            print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in item.items()))
        else:
            print(f"  {item}")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (a few minutes on CPU)")
    size.add_argument("--gpu", action="store_true", help="the GPU preset: bf16, batches 1/64/256, ViT-B/32 and B/16")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--models", nargs="+", help="encode: architectures (default ViT-B-32 RN50)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="encode: batch sizes (default 1 64)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="encode: dtypes (default fp32)")
    parser.add_argument("--no-onnx", action="store_true", help="encode: skip the ONNX Runtime backend")
    parser.add_argument("--train-models", nargs="+", help="train: architectures or JSON configs")
    parser.add_argument("--train-batch-size", type=int, help="train: batch size (default 256)")
    parser.add_argument("--compile", action="store_true", help="train: also time both libraries under torch.compile")
    parser.add_argument("--json", help="write the environment and all results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if args.gpu else "cpu")
    cfg = presets(args)
    env = environment(device)
    missing = [name for name in ("open_clip", "transformers") if env[name] is None]
    print(json.dumps(env))
    if missing:
        print(f"note: {', '.join(missing)} not importable: those comparisons are skipped")
    peaks = measure_peaks(device, set(cfg["encode"]["dtypes"]) | {cfg["train"]["precision"]})
    print("matmul peak: " + ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in peaks.items()))
    rows, others, started = [], {}, time.perf_counter()
    for part in args.parts:
        if part == "encode":
            rows += run_encode(cfg["encode"], device, peaks)
        elif part == "train":
            rows += run_train(cfg["train"], device, peaks)
        elif device == "cpu" and (result := run_other(part, args.quick)) is not None:
            others[part] = result
        print(f"[{part} done at {time.perf_counter() - started:.0f} s]", flush=True)
        if args.json:  # after every part, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"environment": env, "peaks_gflops": peaks, "config": cfg,
                                                   "rows": rows, "other": others}, indent=2, default=str))
    if rows:
        print("\n" + format_table(rows))
    for part, result in others.items():
        _print_other(part, result)
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
