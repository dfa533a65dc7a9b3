"""The public factory: create_model from names, files, dicts and configs; overrides; precision; transforms."""
import inspect

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.io import factory
from clipforge.models import CLIPConfig, get_model_config
from clipforge.transforms import PreprocessConfig


@pytest.mark.parametrize("source", ["name", "json", "dict", "config"])
def test_create_model_from_any_config_source(source):
    config = CLIPConfig.from_json("tests/fixtures/tiny_vit.json")
    name_or_config = {"name": "tests/fixtures/tiny_vit.json", "json": "tests/fixtures/tiny_vit.json",
                      "dict": config.to_dict(), "config": config}[source]
    if source == "name":
        name_or_config, config = "tiny-vit", get_model_config("tiny-vit")
    model = clipforge.create_model(name_or_config)
    assert model.config == config and model.training and model.dtype == torch.float32


def test_overrides_reach_the_towers():
    model = clipforge.create_model("tiny-vit", image_size=64, context_length=16, quick_gelu=True, embed_dim=32)
    assert (model.image_size, model.context_length, model.config.quick_gelu) == (64, 16, True)
    assert model.visual.positional_embedding.shape == (65, 128) and model.text_projection.shape == (128, 32)
    with pytest.raises(TypeError, match="unknown model override.*imag_size"):
        clipforge.create_model("tiny-vit", imag_size=64)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("fp16", torch.float16),
                                             ("bf16", torch.bfloat16)])
def test_precision(precision, dtype, tmp_path):
    model = clipforge.create_model("tiny-vit", precision=precision)
    assert model.dtype == dtype and model.logit_scale.dtype == dtype
    clipforge.save(model, tmp_path / "ckpt")
    loaded, _ = clipforge.load(tmp_path / "ckpt", device="cpu", precision=precision)
    assert loaded.dtype == dtype and clipforge.load(tmp_path / "ckpt", device="cpu")[0].dtype == torch.float32


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown precision 'fp8'; use one of fp32, fp16, bf16"):
        clipforge.create_model("tiny-vit", precision="fp8")
    with pytest.raises(ValueError, match="unknown model 'ViT-Z/99'.*tiny-vit"):
        clipforge.create_model("ViT-Z/99")
    with pytest.raises(TypeError, match="expected a model name, JSON path, dict or CLIPConfig, got int"):
        clipforge.create_model(42)


def test_create_model_and_transforms(tmp_path):
    model, train, evaluate = clipforge.create_model_and_transforms("tiny-vit")
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    assert train(image).shape == evaluate(image).shape == (3, 32, 32)
    assert evaluate.config == PreprocessConfig(image_size=32)
    pre = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    clipforge.save(model, tmp_path / "ckpt", preprocess=pre)
    _, train, evaluate = clipforge.create_model_and_transforms("tiny-vit", pretrained=tmp_path / "ckpt",
                                                                image_size=64)
    assert evaluate.config == PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert train(image).shape == (3, 64, 64)


def test_public_api_is_documented():
    for name in factory.__all__:
        function = getattr(clipforge, name)
        assert function is getattr(factory, name) and inspect.getdoc(function), name
    assert str(inspect.signature(clipforge.create_model)) == (
        "(name_or_config: 'str | Path | dict | CLIPConfig', pretrained: 'str | Path | None' = None, "
        "device: 'str | torch.device | None' = None, precision: 'str' = 'fp32', **overrides: 'Any') -> 'CLIP'")
    assert list(inspect.signature(clipforge.load).parameters) == ["name_or_path", "device", "jit", "download_root",
                                                              "precision",  # OpenAI's order first
                                                              "pretrained", "random_init"]  # then the model-spec rule's
