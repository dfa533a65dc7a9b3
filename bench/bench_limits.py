"""The cost of hostile inputs that README's "Safety and robustness" quotes: peak memory and time.

Peak RSS growth of preprocessing thin PNG strips (Pillow resizing as torchvision's ``Resize(224)`` does,
against clipforge's evaluation transform, which refuses an image whose resized size passes the pixel
limit), each case in a fresh child process, and the time to tokenize long random text with truncation.
    .venv/bin/python bench/bench_limits.py
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

from bench_loss import _peak_rss_bytes as peak_rss_bytes

IMAGE_SIZE = 224
CASES = (("pillow-resize", 1, 10_000), ("clipforge", 1, 10_000), ("clipforge", 1, 1_700), ("clipforge", 1, 1_783))
TEXT_SIZES = (100_000, 1_000_000)


def torchvision_resize_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output: the shorter side to ``size``, the longer side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_case(impl: str, width: int, height: int) -> str:
    """Decode a generated strip, preprocess it with ``impl``, and say what came out and the peak RSS growth."""
    from PIL import Image
    from clipforge.data import BadSample, load_image
    from clipforge.transforms import image_transform

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "strip.png")
        Image.new("RGB", (width, height), (120, 30, 200)).save(path)
        image = load_image(path)
        transform = image_transform(IMAGE_SIZE)
        before = peak_rss_bytes()
        try:
            if impl == "pillow-resize":
                result = "x".join(map(str, image.resize(torchvision_resize_size(width, height, IMAGE_SIZE),
                                                         Image.BICUBIC).size))
            else:
                result = "x".join(map(str, transform(image).shape))
        except BadSample as error:
            result = f"refused ({error.reason})"
    return f"{impl:14s} {width}x{height:<7d} {result:26s} peak RSS growth {(peak_rss_bytes() - before) / 2**20:7.0f} MiB"


def tokenize_time(size: int, seed: int = 11) -> str:
    """Seconds to tokenize ``size`` random code points (no surrogates) with truncation to 77 tokens."""
    from clipforge import tokenize

    rng = random.Random(seed)
    points = [c for c in range(0x20, 0x30000) if not 0xD800 <= c < 0xE000]
    text = "".join(chr(rng.choice(points)) for _ in range(size))
    start = time.perf_counter()
    tokenize(text, truncate=True)
    return f"tokenize, truncate=True, {size:,} random code points: {time.perf_counter() - start:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "WIDTH", "HEIGHT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child process of one preprocessing case
        print(preprocess_case(args.case[0], int(args.case[1]), int(args.case[2])))
        return
    print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for impl, width, height in CASES:
        child = subprocess.run([sys.executable, __file__, "--case", impl, str(width), str(height)],
                               capture_output=True, text=True, check=True)
        print(child.stdout.strip())
    for size in TEXT_SIZES:
        print(tokenize_time(size))


if __name__ == "__main__":
    main()
