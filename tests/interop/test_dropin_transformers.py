"""transformers users: a folder from ``export_hf`` works with transformers' processor, tokenizers, image
processor and zero-shot pipeline alone, and gives clipforge's ids, pixels and probabilities."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.io.hf import export_hf
from clipforge.text_clean import clean_text
from clipforge.tokenizer import Tokenizer
from clipforge.transforms import PreprocessConfig, image_transform

transformers = pytest.importorskip("transformers")

LABELS = ["a diagram", "a dog", "a cat"]
CASES = json.load(open("tests/fixtures/tokenizer_cases.json"))["cases"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(clipforge model, its eval transform, the exported folder): tiny ViT with a sharp temperature."""
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))  # probabilities far from uniform
    folder = export_hf(model, tmp_path_factory.mktemp("hf") / "tiny")
    _, _, preprocess = clipforge.create_model_and_transforms("tiny-vit")
    return model, preprocess, folder


def _image(width=142, height=100, seed=0) -> Image.Image:
    noise = np.random.default_rng(seed).integers(0, 255, (height // 2, width // 2, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((width, height), Image.BILINEAR)  # not square: resize and crop both act


def _our_probabilities(model, preprocess, images, labels=LABELS) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.stack([preprocess(i) for i in images]),
                          clipforge.tokenize(labels, context_length=model.context_length))
    return logits.softmax(-1)


def test_folder_holds_transformers_files(exported):
    names = {p.name for p in exported[2].iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "preprocessor_config.json"} <= names


@pytest.mark.parametrize("processor_class", ["CLIPProcessor", "AutoProcessor"])
def test_processor_and_model_give_clipforges_probabilities(exported, processor_class):
    model, preprocess, folder = exported
    processor = getattr(transformers, processor_class).from_pretrained(folder)
    hf_model = transformers.CLIPModel.from_pretrained(folder).eval()
    images = [_image(), _image(90, 120, seed=1)]
    inputs = processor(text=LABELS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = hf_model(**inputs).logits_per_image.softmax(-1)
    ours = _our_probabilities(model, preprocess, images)
    assert ours.max() > 0.9  # a sharp answer, so agreement is not that of two uniform rows
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_image_processor_gives_clipforges_pixels(tmp_path, resize_mode):
    pre = PreprocessConfig(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25), resize_mode=resize_mode)
    folder = export_hf(clipforge.create_model("tiny-vit"), tmp_path / "hf", preprocess=pre)
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    ours = image_transform(32, mean=pre.mean, std=pre.std, resize_mode=resize_mode)
    for image in (_image(), _image(90, 120, seed=1)):
        pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels, ours(image), atol=1e-6, rtol=0)


def test_longest_resize_cannot_be_described_to_transformers(tmp_path):
    with pytest.raises(ValueError, match="resize_mode='longest'"):
        export_hf(clipforge.create_model("tiny-vit"), tmp_path / "hf",
                  preprocess=PreprocessConfig(image_size=32, resize_mode="longest"))


def test_pipeline_gives_clipforges_probabilities(exported):
    model, preprocess, folder = exported
    classify = transformers.pipeline("zero-shot-image-classification", model=str(folder))
    image = _image()
    results = classify(image, candidate_labels=LABELS, hypothesis_template="{}")  # labels scored as given
    ours = dict(zip(LABELS, _our_probabilities(model, preprocess, [image])[0].tolist()))
    assert [r["label"] for r in results] == sorted(LABELS, key=ours.get, reverse=True)
    for r in results:
        assert r["score"] == pytest.approx(ours[r["label"]], abs=1e-5)


@pytest.mark.parametrize("tokenizer_class", ["CLIPTokenizer", "CLIPTokenizerFast", "AutoTokenizer"])
def test_tokenizers_give_clipforges_ids_up_to_padding(exported, tokenizer_class):
    """transformers' CLIP tokenizer does not run ftfy or HTML unescaping (OpenAI's cleaning) and maps
    literal "<|endoftext|>" to the special id (OpenAI's original choice; clipforge's opt-in): on text
    cleaned as clipforge does, every reference case gives clipforge's ids, padded with end-of-text."""
    tokenizer = getattr(transformers, tokenizer_class).from_pretrained(exported[2], model_max_length=77)
    ours, literal = Tokenizer(77, truncate=True), Tokenizer(77, truncate=True, special_tokens_in_text=True)
    assert len(tokenizer) == ours.vocab_size and tokenizer.pad_token_id == ours.eot_token_id
    for case in CASES:
        text = case["text"]
        expected = (literal if "<|" in text else ours)([text])[0].tolist()
        theirs = tokenizer(clean_text(text), padding="max_length", max_length=77, truncation=True)["input_ids"]
        end = len(np.trim_zeros(expected, "b"))  # the row without clipforge's padding
        assert theirs[:end] == expected[:end], text
        assert set(theirs[end:]) <= {ours.eot_token_id}, text  # transformers pads with end-of-text, clipforge with 0
    assert tokenizer("a photo of a cat.")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 269, 49407]


def test_export_hf_command_writes_a_folder_transformers_reads(saved_tiny_model, tmp_path):
    from clipforge.cli import main

    assert main(["export", "hf", "--model", str(saved_tiny_model), "--output", str(tmp_path / "hf")]) == 0
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    model, preprocess = clipforge.load(saved_tiny_model, device="cpu")
    pixels = processor(images=_image(), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, preprocess(_image()), atol=1e-6, rtol=0)
    assert processor.tokenizer("a cat")["input_ids"] == clipforge.tokenize("a cat", 32)[0, :4].tolist()
