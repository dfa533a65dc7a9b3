"""Image preprocessing for CLIP (Radford et al. 2021) on Pillow + numpy + torch, without torchvision.

The evaluation transform reproduces OpenAI's ``clip._transform`` (torchvision Resize(n, BICUBIC), CenterCrop(n),
convert("RGB"), ToTensor, Normalize) pixel for pixel; training uses torchvision's RandomResizedCrop sampling.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import IO, Any, Union

import numpy as np
import torch
from PIL import Image

from clipforge.data.images import DEFAULT_MAX_PIXELS, load_image  # the one decoder; re-exported here
from clipforge.data.samples import BadSample

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")

ImageSource = Union[Image.Image, str, os.PathLike, bytes, IO[bytes]]


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model's images are preprocessed; saved beside the architecture in a checkpoint's config.

    Keys follow clipforge's names; OpenCLIP's ``preprocess_cfg`` keys (``size``, and ``mode``/``fill_color``
    at their only supported values "RGB"/0) are accepted by ``from_dict``.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        object.__setattr__(self, "mean", _triple(self.mean, "mean", OPENAI_DATASET_MEAN))
        object.__setattr__(self, "std", _triple(self.std, "std", OPENAI_DATASET_STD))
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive in every channel, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {list(_RESIZE_MODES)}, got {self.resize_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists) that ``from_dict`` reads back."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "preprocess config") -> "PreprocessConfig":
        """Build from clipforge's keys or OpenCLIP's ``preprocess_cfg`` keys; unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if "size" in d:
            if "image_size" in d and d["image_size"] != d["size"]:
                raise ValueError(f"{source}: 'size' ({d['size']}) and 'image_size' ({d['image_size']}) disagree")
            d["image_size"] = d.pop("size")
        for key, only in (("mode", "RGB"), ("fill_color", 0)):
            if key in d and d.pop(key) != only:
                raise ValueError(f"{source}: clipforge supports only {key}={only!r}")
        if isinstance(d.get("image_size"), (list, tuple)):
            d["image_size"] = _square_size(d["image_size"], source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; valid keys are {sorted(known)} "
                             "(or OpenCLIP's size, mode, fill_color)")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def _triple(value, name: str, default: tuple[float, ...]) -> tuple[float, float, float]:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        value = (value,) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} needs one value per RGB channel (3), got {len(value)}")
    return value


def _square_size(size, source: str) -> int:
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"{source}: only square image sizes are supported, got {list(size)}")
    return size[0]


# ----------------------------------------------------------------------------------------------- loading

def _as_image(image: ImageSource, draft_size: int | None = None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read"):
        return load_image(image, draft_size=draft_size)
    raise TypeError(f"expected a PIL image, a path, bytes or a binary file, got {type(image).__name__}")


# ------------------------------------------------------------------------------------ resizing and cropping

def _shortest_side_size(width: int, height: int, n: int) -> tuple[int, int]:
    """torchvision's Resize(n) output (width, height): shorter side n, longer int(n * long / short)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(n * long / short)
    return (n, new_long) if width <= height else (new_long, n)


def _longest_side_size(width: int, height: int, n: int) -> tuple[int, int]:
    """OpenCLIP's ResizeKeepRatio(n, longest=1) output (width, height): longer side n, ratio kept."""
    ratio = max(height / n, width / n)
    return max(1, round(width / ratio)), max(1, round(height / ratio))


def _crop_offset(size: int, n: int) -> int:
    """torchvision's center_crop offset along one axis; negative when the image is zero-padded to n."""
    return int(round((size - n) / 2.0)) if size >= n else -((n - size) // 2)


def _center_crop(img: Image.Image, n: int) -> Image.Image:
    """CenterCrop(n): Pillow fills the part of the box outside the image with 0, as torchvision pads."""
    if img.size == (n, n):
        return img
    left, top = _crop_offset(img.width, n), _crop_offset(img.height, n)
    return img.crop((left, top, left + n, top + n))


# ------------------------------------------------------------------------------------------- to tensor

class _Normalizer:
    """ToTensor + Normalize for 8-bit RGB as one table lookup per channel.

    The table holds torchvision's own float32 arithmetic ((v / 255) - mean) / std for each byte v, so the
    lookup is bit-identical to ToTensor followed by Normalize, in one pass over the pixels.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        values = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).expand(3, 256)
        mean_t = torch.tensor(mean, dtype=torch.float32)[:, None]
        std_t = torch.tensor(std, dtype=torch.float32)[:, None]
        self.table = (values - mean_t).div(std_t).numpy()  # (3, 256)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        pixels = np.asarray(img)  # (H, W, 3) for RGB, (H, W) for L
        planes = [pixels] * 3 if pixels.ndim == 2 else [pixels[..., c] for c in range(3)]  # L -> R = G = B
        out = np.empty((3, img.height, img.width), dtype=np.float32)
        for c in range(3):
            np.take(self.table[c], planes[c], out=out[c])
        return torch.from_numpy(out)  # (3, H, W)


# ---------------------------------------------------------------------------------------------- transforms

class EvalTransform:
    """OpenAI's evaluation preprocessing: PIL image (or path/bytes) -> float tensor (3, n, n).

    ``resize_mode="shortest"`` is OpenAI's (shorter side to n, center crop); ``"longest"`` fits the longer
    side to n and zero-pads, ``"squash"`` resizes to n x n ignoring the aspect ratio (both as in OpenCLIP).
    """

    def __init__(self, image_size: int = 224, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                 interpolation: str = "bicubic", resize_mode: str = "shortest"):
        self.config = PreprocessConfig(image_size, mean, std, interpolation, resize_mode)
        self._normalize = _Normalizer(self.config.mean, self.config.std)

    def __call__(self, image: ImageSource) -> torch.Tensor:
        img = _as_image(image)
        width, height = img.size
        if width == 0 or height == 0:
            raise ValueError(f"cannot preprocess an empty image of size {width}x{height}")
        size = self.resized_size(width, height)
        n = self.config.image_size
        if size != img.size:
            img = img.resize(size, _INTERPOLATIONS[self.config.interpolation])
        return self._normalize(_center_crop(img, n))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image is resized to before the centre crop; raises ``BadSample``
        (``too_many_pixels``) when that has more pixels than the decoder's limit ``DEFAULT_MAX_PIXELS``.

        Only ``"shortest"`` can exceed it: a thin strip's shorter side is scaled up to ``image_size``, so a
        1x10000 image would become 224x2240000 before being cropped back to 224x224.
        """
        n, mode = self.config.image_size, self.config.resize_mode
        size = (n, n) if mode == "squash" else (
            _shortest_side_size if mode == "shortest" else _longest_side_size)(width, height, n)
        if size[0] * size[1] > DEFAULT_MAX_PIXELS:
            raise BadSample("too_many_pixels", f"a {width}x{height} image resized to a shorter side of {n} would "
                                               f"be {size[0]}x{size[1]} = {size[0] * size[1]} pixels, more than "
                                               f"max_pixels={DEFAULT_MAX_PIXELS} (an aspect ratio over "
                                               f"{DEFAULT_MAX_PIXELS // (n * n)}:1); crop it first")
        return size

    def __repr__(self) -> str:
        c = self.config
        return (f"EvalTransform(image_size={c.image_size}, resize_mode={c.resize_mode!r}, "
                f"interpolation={c.interpolation!r}, mean={c.mean}, std={c.std})")


class TrainTransform:
    """Training preprocessing: torchvision's RandomResizedCrop sampling, resize to n x n, RGB, normalise.

    Randomness comes from ``generator`` (per call, else the one given here, else torch's global RNG, which
    DataLoader seeds differently in each worker). A generator given here is copied into every worker, so
    workers would repeat each other's crops: for per-sample determinism pass a seeded generator per call.
    With ``draft=True``, JPEG paths/bytes decode at reduced scale (see ``load_image``); faster, but the
    pixels then differ slightly from a full decode.
    """

    def __init__(self, image_size: int = 224, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                 scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 interpolation: str = "bicubic", generator: torch.Generator | None = None, draft: bool = False):
        self.config = PreprocessConfig(image_size, mean, std, interpolation)
        self.scale = _interval(scale, "scale")
        self.ratio = _interval(ratio, "ratio")
        self.generator = generator
        # The smallest crop side is shorter_side * sqrt(scale_min * aspect_min); keep it >= image_size.
        aspect_min = min(min(r, 1 / r) for r in self.ratio)
        self.draft_size = math.ceil(image_size / math.sqrt(self.scale[0] * aspect_min)) if draft else None
        self._normalize = _Normalizer(self.config.mean, self.config.std)

    def sample_crop(self, width: int, height: int,
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """RandomResizedCrop.get_params: (top, left, height, width), same torch RNG draws as torchvision."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio)).tolist()
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect = torch.exp(torch.empty(1).uniform_(*log_ratio, generator=generator)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
                return top, left, h, w
        return _central_crop_fallback(width, height, self.ratio)

    def __call__(self, image: ImageSource, generator: torch.Generator | None = None) -> torch.Tensor:
        img = _as_image(image, self.draft_size)
        if img.width == 0 or img.height == 0:
            raise ValueError(f"cannot preprocess an empty image of size {img.width}x{img.height}")
        top, left, h, w = self.sample_crop(img.width, img.height,
                                           generator if generator is not None else self.generator)
        img = img.crop((left, top, left + w, top + h))
        n = self.config.image_size
        if img.size != (n, n):
            img = img.resize((n, n), _INTERPOLATIONS[self.config.interpolation])
        return self._normalize(img)

    def __repr__(self) -> str:
        c = self.config
        return (f"TrainTransform(image_size={c.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={c.interpolation!r}, mean={c.mean}, std={c.std}, "
                f"generator={'given' if self.generator is not None else 'global'}, "
                f"draft={self.draft_size is not None})")


def _interval(value, name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {tuple(value)}")
    return lo, hi


def _central_crop_fallback(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback after 10 failed draws: the central crop with the nearest allowed aspect."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_transform(image_size: int, is_train: bool = False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                    scale: tuple[float, float] = (0.9, 1.0), interpolation: str = "bicubic",
                    resize_mode: str = "shortest") -> EvalTransform | TrainTransform:
    """The preprocessing callable for a model: OpenAI's exact eval transform, or the training transform.

    ``scale`` applies to training only and ``resize_mode`` to evaluation only, as in OpenCLIP.
    """
    if is_train:
        return TrainTransform(image_size, mean, std, scale=scale, interpolation=interpolation)
    return EvalTransform(image_size, mean, std, interpolation=interpolation, resize_mode=resize_mode)
