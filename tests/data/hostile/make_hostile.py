"""Writes the small hostile files of issue 11 kept in this folder (run it from anywhere to rebuild them).

Checkpoint payloads (pickles that would run code, damaged training states) are built by the tests that
use them, so that no file here can run anything.
"""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels but which carries no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def photo(width: int = 64, height: int = 48) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([(x * 4) % 256, (y * 5) % 256, (x + y) % 256], -1).astype(np.uint8))


def files() -> dict[str, bytes]:
    png, jpg = _encoded(photo(), "PNG"), _encoded(photo(), "JPEG")
    return {
        "strip_1x10000.png": _encoded(Image.new("RGB", (1, 10000), (120, 30, 200)), "PNG"),  # 224x2240000 resized
        "strip_10000x1.png": _encoded(Image.new("L", (10000, 1), 90), "PNG"),
        "strip_1x100000.png": _encoded(Image.new("RGB", (1, 100000), (0, 90, 0)), "PNG"),  # too long at any size
        "header_bomb_20000x5000.png": header_only_png(20000, 5000),  # 100 M pixels declared, none stored
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "not_an_image.jpg": b"<html>404 not found</html>",
        "empty.png": b"",
        "labels_latin1.txt": "café\nnaïve\n".encode("latin-1"),
        "labels_bom.txt": "\ufeffcat\ndog\n".encode("utf-8"),
    }


if __name__ == "__main__":
    for name, data in files().items():
        (HERE / name).write_bytes(data)
        print(f"wrote {HERE / name} ({len(data)} bytes)")
