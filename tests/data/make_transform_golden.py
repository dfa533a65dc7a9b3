"""Writes tests/data/transforms_golden.npz: torchvision/OpenCLIP preprocessing outputs for test_transforms.py.

How the golden file was made: run this with the reference environment (torchvision + open_clip), from the
repository root:
    /work/refenv/venv/bin/python tests/data/make_transform_golden.py
It builds deterministic synthetic images in many Pillow modes and sizes (smooth waves with hard-edged
shapes; noise only on tiny images, so the file compresses well), runs the references on them, and stores:
  * ``in__<case>``: each input's raw Pillow bytes (``Image.tobytes``) as rows, shape (H, bytes per row),
    ``pal__<case>`` its palette for mode "P"; case ``photo_jpeg`` holds a JPEG file's bytes instead;
  * ``out__<key>``: the reference's 8-bit RGB image just before ToTensor, shape (H, W, 3);
  * ``norm_table``: torchvision's ToTensor + Normalize (OpenAI mean/std) of every byte value, shape (3, 256).
Image arrays are stored as differences from the row above, modulo 256 (``np.cumsum(a, 0, dtype=uint8)``
undoes it), which makes smooth images compress well. The script checks that every reference float output
equals ``norm_table[c][pixel]`` exactly, so the test recovers the reference tensors bit for bit from the
8-bit images, which keeps the file small.
References: OpenAI's ``_transform`` (Compose[Resize(n, BICUBIC), CenterCrop(n), RGB, ToTensor, Normalize]),
OpenCLIP's ``image_transform`` for resize modes "longest"/"squash", and torchvision's RandomResizedCrop
(+ RGB, ToTensor, Normalize) after ``torch.manual_seed(seed)`` for the training transform.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import PIL
import torch
import torchvision
from PIL import Image
from torchvision.transforms import (CenterCrop, Compose, InterpolationMode, Normalize, RandomResizedCrop, Resize,
                                    ToTensor)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
OUT = Path(__file__).with_name("transforms_golden.npz")

# (33, 32), (35, 32), (32, 37), and the 321x240 JPEG at 224, put the centre crop at a half pixel (round half to even).
RGB_SHAPES = [(1, 1), (2, 3), (7, 300), (300, 7), (17, 31), (31, 17), (32, 32), (33, 32), (35, 32), (32, 37),
              (33, 33), (48, 64), (65, 49), (100, 75), (640, 12), (12, 640)]
OTHER_SHAPES = [(1, 1), (7, 300), (31, 17), (65, 49), (120, 90)]
OTHER_MODES = ["L", "P", "RGBA", "LA", "CMYK", "1", "YCbCr", "I;16", "I", "F"]
EVAL_224 = ["RGB_7x300", "L_120x90", "P_120x90", "photo_jpeg"]
EVAL_64 = ["RGB_", "RGBA_", "photo_jpeg"]  # name prefixes; the other modes are checked at 32 only
OPENCLIP_MODES = [("longest", c) for c in ["RGB_100x75", "RGB_7x300", "RGB_640x12", "RGBA_31x17", "P_65x49",
                                           "L_1x1"]] + [("squash", c) for c in ["RGB_100x75", "LA_31x17"]]
TRAIN_CASES = ["RGB_100x75", "RGB_7x300", "L_65x49", "RGBA_31x17", "CMYK_120x90"]


def _pattern(width: int, height: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth waves and gradients with a few flat rectangles (hard edges), in [0, 1], shape (H, W, C)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, channels)
    img = np.stack([0.5 + 0.3 * np.sin(x / (9 + 5 * c) + y / (13 + 4 * c) + phase[c]) + 0.2 * (x / width - y / height)
                    for c in range(channels)], axis=-1)
    for _ in range(3):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + max(1, height // 4), x0:x0 + max(1, width // 4)] = rng.uniform(0, 1, channels)
    if width * height <= 300:
        img += rng.normal(0, 0.05, img.shape)
    return np.clip(img, 0, 1)


def _image(mode: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    rgb = Image.fromarray((_pattern(width, height, 3, rng) * 255).round().astype(np.uint8))
    alpha = (_pattern(width, height, 1, rng)[..., 0] * 255).round().astype(np.uint8)
    if mode in ("RGB", "L", "1", "YCbCr"):
        return rgb.convert(mode)
    if mode == "P":
        return rgb.quantize(colors=24)
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode[:-1])
        img.putalpha(Image.fromarray(alpha))
        return img
    if mode == "CMYK":
        cmyk = (_pattern(width, height, 4, rng) * 255).astype(np.uint8)
        return Image.frombytes("CMYK", (width, height), cmyk.tobytes())
    wide = _pattern(width, height, 1, rng)[..., 0]
    if mode == "I;16":
        return Image.fromarray((wide * 600).astype(np.uint16))  # below and above 255: tests clipping
    if mode == "I":
        return Image.fromarray((wide * 800 - 200).astype(np.int32))
    return Image.fromarray(((wide * 450 - 50) * 8).round().astype(np.float32) / 8)  # "F", short mantissas


def _inputs() -> dict[str, Image.Image]:
    rng = np.random.default_rng(20240601)
    images = {f"RGB_{w}x{h}": _image("RGB", w, h, rng) for w, h in RGB_SHAPES}
    for mode in OTHER_MODES:
        images.update({f"{mode}_{w}x{h}": _image(mode, w, h, rng) for w, h in OTHER_SHAPES})
    return images


def _photo_jpeg() -> bytes:
    """A 321x240 photo-like JPEG (quality 90), larger than the 224 crop."""
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray((_pattern(321, 240, 3, rng) * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _row_delta(rows: np.ndarray) -> np.ndarray:
    """Each row minus the row above, modulo 256 (the first row kept): undone by a uint8 cumsum over axis 0."""
    return np.diff(rows, axis=0, prepend=np.zeros_like(rows[:1]))


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


def _eval_pipeline(n: int, resize_mode: str):
    """The reference up to (and without) ToTensor + Normalize, which are applied and checked separately."""
    if resize_mode == "shortest":  # OpenAI's clip._transform
        return Compose([Resize(n, interpolation=InterpolationMode.BICUBIC), CenterCrop(n), _to_rgb])
    full = open_clip.image_transform(n, is_train=False, resize_mode=resize_mode)
    return Compose(full.transforms[:-2])  # drop MaybeToTensor, Normalize


def _check_and_store(store: dict, key: str, rgb: Image.Image, full: torch.Tensor, table: torch.Tensor) -> None:
    pixels = np.array(rgb)
    assert rgb.mode == "RGB" and pixels.shape[:2] == full.shape[1:], key
    from_table = table[torch.arange(3)[:, None, None], torch.from_numpy(pixels).permute(2, 0, 1).long()]
    assert torch.equal(from_table, full), f"{key}: reference output is not table[pixel]"
    store[f"out__{key}"] = _row_delta(pixels)


def main() -> None:
    to_tensor = Compose([ToTensor(), Normalize(MEAN, STD)])
    table = to_tensor(Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)))[:, 0, :]
    images = _inputs()
    store: dict[str, np.ndarray] = {"norm_table": table.numpy()}
    meta = {"versions": {"pillow": PIL.__version__, "torchvision": torchvision.__version__,
                         "torch": torch.__version__, "open_clip": open_clip.__version__},
            "inputs": {}, "outputs": []}
    for name, img in images.items():
        store[f"in__{name}"] = _row_delta(np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, -1))
        if img.mode == "P":
            store[f"pal__{name}"] = np.frombuffer(bytes(img.getpalette()), dtype=np.uint8)
        meta["inputs"][name] = {"mode": img.mode, "size": list(img.size)}
    jpeg = _photo_jpeg()
    store["in__photo_jpeg"] = np.frombuffer(jpeg, dtype=np.uint8)
    meta["inputs"]["photo_jpeg"] = {"mode": "JPEG", "size": list(Image.open(io.BytesIO(jpeg)).size)}
    images["photo_jpeg"] = Image.open(io.BytesIO(jpeg))

    def add(key, record, rgb, full):
        _check_and_store(store, key, rgb, full, table)
        meta["outputs"].append({"key": key, **record})

    for name, img in images.items():
        sizes = [32] + ([64] if name.startswith(tuple(EVAL_64)) else []) + ([224] if name in EVAL_224 else [])
        for n in sizes:
            rgb = _eval_pipeline(n, "shortest")(img)
            add(f"eval_{name}_{n}", {"kind": "eval", "input": name, "image_size": n, "resize_mode": "shortest"},
                rgb, to_tensor(rgb))
    for mode, name in OPENCLIP_MODES:
        rgb = _eval_pipeline(32, mode)(images[name])
        full = open_clip.image_transform(32, is_train=False, resize_mode=mode)(images[name])
        add(f"eval_{mode}_{name}_32", {"kind": "eval", "input": name, "image_size": 32, "resize_mode": mode},
            rgb, full)
    for name in TRAIN_CASES:
        for scale in [(0.9, 1.0), (0.08, 1.0)]:
            for seed in range(3):
                torch.manual_seed(seed)
                crop = RandomResizedCrop(32, scale=scale, interpolation=InterpolationMode.BICUBIC)(images[name])
                rgb = _to_rgb(crop)
                add(f"train_{name}_{scale[0]}_{seed}", {"kind": "train", "input": name, "image_size": 32,
                                                        "scale": list(scale), "seed": seed}, rgb, to_tensor(rgb))
    store["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **store)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB): {len(meta['inputs'])} inputs, "
          f"{len(meta['outputs'])} reference outputs")


if __name__ == "__main__":
    main()
