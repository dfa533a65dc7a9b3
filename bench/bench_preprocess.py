"""Image preprocessing from a JPEG path (open + decode + transform): clipforge vs OpenCLIP's transforms.

Photo-like JPEGs (smooth gradients, shapes and noise, quality 90, 256 to 2400 px) are written to a temp
dir; implementations run interleaved, image by image, and each image's best of ``repeats`` runs counts.
Evaluation outputs are compared (max abs diff), as are training outputs under the same torch seed.
"decode only" and "decode + PIL resize" rows show the ceiling for a pixel-exact evaluation path.
One torch thread. Run with the reference environment, which has open_clip:
    PYTHONPATH=src /work/refenv/venv/bin/python bench/bench_preprocess.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = [(256, 256), (320, 240), (375, 500), (500, 375), (640, 480), (800, 600), (768, 1024), (1024, 768),
         (1280, 960), (1200, 1600), (1600, 1200), (2048, 1536), (2400, 1600)]


def _photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A smooth, photo-like RGB image: gradients, sinusoids, a few flat shapes and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    img = np.stack([128 + 90 * np.sin(x / (37 + 40 * c) + y / (61 - 15 * c) + phase[c]) + 40 * (x / width - y / height)
                    for c in range(3)], axis=-1)
    for _ in range(6):  # flat rectangles give hard edges, where bicubic overshoots and clipping matter
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + height // 5, x0:x0 + width // 5] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_jpegs(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for width, height in SIZES:
        path = folder / f"photo_{width}x{height}.jpg"
        _photo(width, height, rng).save(path, quality=90)
        paths.append(path)
    return paths


def _reference_transforms(image_size: int):
    """OpenCLIP's eval and train transforms (the eval one is OpenAI's Resize/CenterCrop/RGB/ToTensor/Normalize)."""
    import open_clip
    return (open_clip.image_transform(image_size, is_train=False),
            open_clip.image_transform(image_size, is_train=True))


def _time_all(functions: dict, paths: list[Path], repeats: int) -> dict[str, float]:
    """Seconds per pass over all paths for each function: the sum over images of each image's best time.

    Calls are interleaved (image by image, function by function) and each image keeps its fastest of
    ``repeats`` runs, which keeps the comparison fair on a busy machine.
    """
    best = {name: [float("inf")] * len(paths) for name in functions}
    for _ in range(repeats):
        for i, path in enumerate(paths):
            for name, fn in functions.items():
                start = time.perf_counter()
                fn(path)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(times) for name, times in best.items()}


def _max_abs_diff(fn_a, fn_b, paths: list[Path], seeded: bool = False) -> float:
    diff = 0.0
    for i, path in enumerate(paths):
        if seeded:
            torch.manual_seed(i)
        a = fn_a(path)
        if seeded:
            torch.manual_seed(i)
        diff = max(diff, (a - fn_b(path)).abs().max().item())
    return diff


def _pil_bounds(image_size: int):
    """Decode only, and decode + the bicubic resize: the work any pixel-exact eval path must still do."""
    from clipforge.transforms import _shortest_side_size

    def decode_resize(path):
        img = Image.open(path)
        return img.resize(_shortest_side_size(*img.size, image_size), Image.Resampling.BICUBIC)
    return {"decode only": lambda p: Image.open(p).load(), "decode + PIL resize": decode_resize}


def run(repeats: int = 3, image_size: int = 224) -> dict:
    """Time every implementation over the JPEG set; images/s, speedups and output differences."""
    from clipforge.transforms import EvalTransform, TrainTransform
    torch.set_num_threads(1)
    ref_eval, ref_train = _reference_transforms(image_size)
    ours_eval, ours_train = EvalTransform(image_size), TrainTransform(image_size)
    ours_draft = TrainTransform(image_size, draft=True)
    functions = {
        "openclip eval": lambda p: ref_eval(Image.open(p)), "clipforge eval": ours_eval,
        **_pil_bounds(image_size),
        "openclip train": lambda p: ref_train(Image.open(p)), "clipforge train": ours_train,
        "clipforge train (draft)": ours_draft,
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_jpegs(Path(tmp))
        for fn in functions.values():  # warm-up
            fn(paths[0])
        seconds = _time_all(functions, paths, repeats)
        eval_diff = _max_abs_diff(functions["openclip eval"], ours_eval, paths)
        train_diff = _max_abs_diff(functions["openclip train"], ours_train, paths, seeded=True)
    rate = {name: len(paths) / s for name, s in seconds.items()}
    return {
        "images": len(paths), "sizes": [f"{w}x{h}" for w, h in SIZES], "image_size": image_size,
        "torch_threads": 1, "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "eval_speedup": round(rate["clipforge eval"] / rate["openclip eval"], 3),
        "eval_ceiling_speedup": round(rate["decode + PIL resize"] / rate["openclip eval"], 3),
        "eval_max_abs_diff": eval_diff,
        "train_speedup": round(rate["clipforge train"] / rate["openclip train"], 3),
        "train_draft_speedup": round(rate["clipforge train (draft)"] / rate["openclip train"], 3),
        "train_max_abs_diff_same_seed": train_diff,
    }


def _print(result: dict) -> None:
    print(f"{result['images']} JPEGs ({', '.join(result['sizes'])}) -> {result['image_size']} px, 1 torch thread")
    for name, value in result["images_per_s"].items():
        print(f"  {name:26s} {value:8.1f} images/s")
    print(f"eval:  clipforge / openclip = {result['eval_speedup']:.2f}x  "
          f"(ceiling for an exact path, decode + resize alone: {result['eval_ceiling_speedup']:.2f}x), "
          f"max abs diff {result['eval_max_abs_diff']:.3g}")
    print(f"train: clipforge / openclip = {result['train_speedup']:.2f}x, with draft decode "
          f"{result['train_draft_speedup']:.2f}x; max abs diff under the same seed "
          f"{result['train_max_abs_diff_same_seed']:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per image and implementation (the best counts)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="print the result dict as JSON as well")
    args = parser.parse_args()
    out = run(args.repeats, args.image_size)
    _print(out)
    if args.json:
        print(json.dumps(out, indent=2))
