"""Tests for clipforge.transforms: golden parity with torchvision/OpenCLIP, training crops, loading errors."""
from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.transforms import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, EvalTransform, PreprocessConfig,
                                  TrainTransform, image_transform, load_image)

GOLDEN_PATH = Path(__file__).parents[1] / "fixtures" / "transforms_golden.npz"  # made by make_transform_golden.py
with np.load(GOLDEN_PATH, allow_pickle=False) as _npz:
    GOLDEN = {key: _npz[key] for key in _npz.files}
META = json.loads(str(GOLDEN["meta"]))
OUTPUTS = {kind: [o for o in META["outputs"] if o["kind"] == kind] for kind in ("eval", "train")}


def _undo_row_delta(a: np.ndarray) -> np.ndarray:
    return np.cumsum(a, axis=0, dtype=np.uint8)


def _golden_input(name: str):
    """The stored input: a PIL image, or for the JPEG case the file's bytes."""
    info = META["inputs"][name]
    if info["mode"] == "JPEG":
        return GOLDEN[f"in__{name}"].tobytes()
    img = Image.frombytes(info["mode"], tuple(info["size"]), _undo_row_delta(GOLDEN[f"in__{name}"]).tobytes())
    if info["mode"] == "P":
        img.putpalette(GOLDEN[f"pal__{name}"].tobytes())
    return img


def _golden_output(key: str) -> torch.Tensor:
    """The reference tensor: torchvision's ToTensor + Normalize table applied to the stored 8-bit RGB image."""
    pixels = torch.from_numpy(_undo_row_delta(GOLDEN[f"out__{key}"])).permute(2, 0, 1).long()  # (3, H, W)
    return torch.from_numpy(GOLDEN["norm_table"])[torch.arange(3)[:, None, None], pixels]


def _assert_matches(out: torch.Tensor, key: str) -> None:
    expected = _golden_output(key)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    diff = (out - expected).abs().max().item()
    assert diff <= 1e-6, f"{key}: max abs diff {diff} (golden made with {META['versions']})"


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like RGB image."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    img = np.stack([128 + 100 * np.sin(x / 23 + y / (31 + 7 * c) + c) for c in range(3)], -1)
    return Image.fromarray(np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ golden parity

@pytest.mark.parametrize("case", OUTPUTS["eval"], ids=[o["key"] for o in OUTPUTS["eval"]])
def test_eval_matches_reference(case):
    transform = EvalTransform(case["image_size"], resize_mode=case["resize_mode"])
    _assert_matches(transform(_golden_input(case["input"])), case["key"])


@pytest.mark.parametrize("case", OUTPUTS["train"], ids=[o["key"] for o in OUTPUTS["train"]])
def test_train_matches_torchvision_random_resized_crop(case):
    transform = TrainTransform(case["image_size"], scale=tuple(case["scale"]))
    img = _golden_input(case["input"])
    _assert_matches(transform(img, generator=torch.Generator().manual_seed(case["seed"])), case["key"])
    with torch.random.fork_rng():  # torch's global RNG, as torchvision and DataLoader workers use it
        torch.manual_seed(case["seed"])
        _assert_matches(transform(img), case["key"])


def test_golden_covers_modes_and_sizes():
    modes = {META["inputs"][o["input"]]["mode"] for o in OUTPUTS["eval"]}
    assert {"RGB", "L", "P", "RGBA", "CMYK", "LA", "1", "I;16", "I", "F", "JPEG"} <= modes
    assert {o["image_size"] for o in OUTPUTS["eval"]} == {32, 64, 224}
    assert {o["resize_mode"] for o in OUTPUTS["eval"]} == {"shortest", "longest", "squash"}


# ----------------------------------------------------------------------------------------- eval transform

def test_eval_non_square_photo_is_centre_crop_of_shorter_side_resize():
    img = _photo(300, 200)
    out = EvalTransform(224)(img)
    assert out.shape == (3, 224, 224)
    # Same steps by hand: shorter side to 224 -> 336 x 224, centre crop at x = 56, ToTensor, Normalize.
    crop = np.asarray(img.resize((336, 224), Image.Resampling.BICUBIC).crop((56, 0, 280, 224)), dtype=np.float32)
    mean, std = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None], torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    expected = (torch.from_numpy(crop).permute(2, 0, 1).div(255) - mean) / std
    assert torch.equal(out, expected)


def test_eval_accepts_image_path_bytes_and_file_object(tmp_path):
    data = _jpeg_bytes(_photo(90, 70))
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    transform = EvalTransform(32)
    expected = transform(Image.open(io.BytesIO(data)))
    for source in (str(path), path, data, io.BytesIO(data)):
        assert torch.equal(transform(source), expected)


def test_eval_resize_modes_keep_the_whole_image_or_squash_it():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    longest = EvalTransform(32, resize_mode="longest")(img)
    black = (0 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    assert torch.allclose(longest[:, 0, 0], black) and torch.allclose(longest[:, -1, 0], black)  # zero padding
    squash = EvalTransform(32, resize_mode="squash")(img)
    assert torch.allclose(squash, squash[:, :1, :1].expand_as(squash))  # all white, nothing cropped or padded


def test_transforms_reject_bad_input():
    with pytest.raises(TypeError, match="PIL image"):
        EvalTransform(32)(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty image"):
        EvalTransform(32)(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="empty image"):
        TrainTransform(32)(Image.new("RGB", (5, 0)))


# ---------------------------------------------------------------------------------------- train transform

def test_train_output_shape_range_and_determinism():
    transform = TrainTransform(64)
    img = _photo(200, 150)
    out = transform(img, generator=torch.Generator().manual_seed(1))
    lo = (0 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    hi = (1 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert (out >= lo[:, None, None]).all() and (out <= hi[:, None, None]).all()
    assert torch.equal(out, transform(img, generator=torch.Generator().manual_seed(1)))
    seeded = TrainTransform(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, seeded(img))
    assert not torch.equal(out, transform(img, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0), (0.3, 0.5)])
def test_train_crops_respect_scale_and_ratio(scale):
    transform = TrainTransform(32, scale=scale)
    generator = torch.Generator().manual_seed(0)
    width, height = 640, 480
    for _ in range(300):
        top, left, h, w = transform.sample_crop(width, height, generator)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        # w and h are rounded to whole pixels, so the bounds hold up to that rounding
        assert scale[0] * 0.98 <= w * h / (width * height) <= scale[1] * 1.02
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_train_falls_back_to_central_crop_when_no_draw_fits():
    # A 7 x 300 strip cannot hold 90% of its area at an aspect ratio in [3/4, 4/3]: the central 7 x 9 crop.
    assert TrainTransform(32).sample_crop(7, 300, torch.Generator().manual_seed(0)) == (145, 0, 9, 7)
    assert TrainTransform(32).sample_crop(300, 7, torch.Generator().manual_seed(0)) == (0, 145, 7, 9)


def test_train_draft_decodes_jpegs_at_reduced_size():
    data = _jpeg_bytes(_photo(1600, 1200))
    transform = TrainTransform(224, draft=True)
    assert transform.draft_size == math.ceil(224 / math.sqrt(0.9 * 0.75))
    # 1/4 scale is the strongest that keeps both sides >= draft_size (273): 400 x 300
    assert load_image(data, draft_size=transform.draft_size).size == (400, 300)
    assert transform(data, generator=torch.Generator().manual_seed(0)).shape == (3, 224, 224)
    assert TrainTransform(224).draft_size is None
    png = io.BytesIO()
    _photo(600, 500).save(png, "PNG")
    assert load_image(png.getvalue(), draft_size=100).size == (600, 500)  # draft only affects JPEGs


# -------------------------------------------------------------------------------- API, repr, pickling

def test_image_transform_factory_and_validation():
    eval_tf = image_transform(224)
    assert isinstance(eval_tf, EvalTransform) and eval_tf.config == PreprocessConfig()
    train_tf = image_transform(64, is_train=True, scale=(0.5, 1.0), interpolation="bilinear")
    assert isinstance(train_tf, TrainTransform) and train_tf.scale == (0.5, 1.0)
    assert train_tf.config.interpolation == "bilinear"
    for bad in (dict(image_size=0), dict(image_size=32, interpolation="lanczos"),
                dict(image_size=32, resize_mode="fill"), dict(image_size=32, std=(0.2, 0.0, 0.2)),
                dict(image_size=32, mean=(0.5, 0.5))):
        with pytest.raises(ValueError):
            image_transform(**bad)
    with pytest.raises(ValueError, match="scale"):
        image_transform(32, is_train=True, scale=(1.0, 0.5))


def test_repr_names_the_settings():
    text = repr(EvalTransform(224, resize_mode="squash"))
    assert text.startswith("EvalTransform(") and "224" in text and "squash" in text and "bicubic" in text
    text = repr(TrainTransform(32, scale=(0.5, 1.0)))
    assert text.startswith("TrainTransform(") and "(0.5, 1.0)" in text and "global" in text


def test_transforms_pickle_and_keep_their_state():
    img = _photo(120, 80)
    eval_tf = EvalTransform(32, mean=0.5, std=0.25)
    assert torch.equal(pickle.loads(pickle.dumps(eval_tf))(img), eval_tf(img))
    train_tf = TrainTransform(32, generator=torch.Generator().manual_seed(3), draft=True)
    copy = pickle.loads(pickle.dumps(train_tf))
    assert torch.equal(copy(img), train_tf(img))  # the generator state travels with it


class _Images(torch.utils.data.Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i])


@pytest.mark.parametrize("transform", [EvalTransform(32), TrainTransform(32)], ids=["eval", "train"])
def test_transforms_work_in_a_dataloader(transform):
    images = [_photo(60 + 10 * i, 50 + 5 * i) for i in range(4)]
    batch = next(iter(torch.utils.data.DataLoader(_Images(images, transform), batch_size=4)))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32


def test_preprocess_config_round_trips_and_reads_openclip_keys():
    cfg = PreprocessConfig(336, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert image_transform(**cfg.to_dict()).config == cfg
    openclip = {"size": [336, 336], "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3,
                "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0}
    assert PreprocessConfig.from_dict(openclip) == cfg
    with pytest.raises(ValueError, match="unknown key.*'crop_pct'.*valid keys"):
        PreprocessConfig.from_dict({"crop_pct": 0.9})
    with pytest.raises(ValueError, match="fill_color"):
        PreprocessConfig.from_dict({"fill_color": 255})
    with pytest.raises(ValueError, match="square"):
        PreprocessConfig.from_dict({"size": [224, 256]})


def test_public_api_exports():
    assert clipforge.PreprocessConfig is PreprocessConfig
    assert clipforge.OPENAI_DATASET_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert clipforge.OPENAI_DATASET_STD == (0.26862954, 0.26130258, 0.27577711)
    assert clipforge.image_transform is image_transform


# ------------------------------------------------------------------------------------------- load_image

def test_load_image_returns_a_decoded_image(tmp_path):
    path = tmp_path / "ok.png"
    _photo(30, 20).save(path)
    img = load_image(path)
    assert img.size == (30, 20) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), np.asarray(_photo(30, 20)))


def test_load_image_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    data = _jpeg_bytes(_photo(200, 150))
    truncated.write_bytes(data[: len(data) // 2])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not an image\n")
    large = tmp_path / "large.png"
    _photo(50, 40).save(large)
    cases = [(empty, {}, "empty"), (truncated, {}, "truncated"), (not_image, {}, "not an image"),
             (large, {"max_pixels": 1999}, "max_pixels=1999")]
    for path, kwargs, reason in cases:
        with pytest.raises(ValueError, match=reason) as info:
            load_image(path, **kwargs)
        assert str(path) in str(info.value)
    assert load_image(large, max_pixels=2000).size == (50, 40)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="<bytes>"):
        load_image(data[:100])
