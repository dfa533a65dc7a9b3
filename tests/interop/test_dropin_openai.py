"""OpenAI ``clip`` users: ``load``'s signature with ``jit=``, the model attributes OpenAI's model has, the
too-long-text error type, and ``classify`` scoring labels as given (OpenAI's README example)."""
import inspect
import json
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.data.shapes import write_classification
from clipforge.tokenizer import TextTooLongError
from clipforge.zeroshot import ZeroShotClassifier


def test_load_takes_openais_arguments_in_openais_order(saved_tiny_model, tmp_path):
    assert list(inspect.signature(clipforge.load).parameters)[:4] == ["name_or_path", "device", "jit",
                                                                      "download_root"]
    model, preprocess = clipforge.load(saved_tiny_model, "cpu", False, tmp_path)  # clip.load(name, device, jit, root)
    assert not model.training and preprocess.config.image_size == model.image_size
    with pytest.raises(ValueError, match="jit=True is not supported.*never executing them"):
        clipforge.load(saved_tiny_model, device="cpu", jit=True)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_model_has_openais_attributes(name):
    model = clipforge.create_model(name)
    config = model.config
    assert model.visual.input_resolution == config.vision_cfg.image_size
    assert model.visual.output_dim == config.embed_dim
    assert model.context_length == config.text_cfg.context_length and model.vocab_size == config.text_cfg.vocab_size
    with torch.no_grad():
        images = torch.randn(1, 3, model.visual.input_resolution, model.visual.input_resolution)
        assert model.encode_image(images).shape == (1, model.visual.output_dim)


def test_too_long_text_is_openais_runtime_error_and_a_value_error():
    text = "word " * 100
    for kind in (RuntimeError, ValueError, TextTooLongError):
        with pytest.raises(kind, match="more than context_length=77"):
            clipforge.tokenize(text)
    assert clipforge.tokenize(text, truncate=True)[0, -1] == 49407


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_classification(tmp_path_factory.mktemp("shapes") / "val", split="all", num_samples=8,
                                  by="colour", fmt="folder")
    return [str(p) for p in sorted(Path(folder).rglob("*.png"))[:2]]


@pytest.mark.parametrize("flags", [["--no-template"], ["--templates", "{}"]])
def test_classify_scores_labels_as_given(saved_tiny_model, images, capsys, flags):
    labels = ["a red shape", "a blue shape", "a green shape"]
    assert main(["classify", *images, "--model", str(saved_tiny_model), "--labels", ",".join(labels), "--json",
                 *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    model, preprocess = clipforge.load(saved_tiny_model, device="cpu")
    batch = torch.stack([preprocess(clipforge.transforms.load_image(p)) for p in images])
    with torch.no_grad():  # OpenAI's README computation: logits of the raw texts, softmax over them
        logits, _ = model(batch, clipforge.tokenize(labels, context_length=model.context_length))
    expected = logits.softmax(-1)
    for row, probs in zip(out, expected):
        for prediction in row["predictions"]:
            assert prediction["probability"] == pytest.approx(probs[labels.index(prediction["label"])].item(),
                                                              abs=1e-5)
    templated = ZeroShotClassifier(model, labels, ["a photo of a {}."]).predict(batch, 3)
    assert any(abs(dict(t)[label] - expected[i, j].item()) > 1e-4  # the default template would differ
               for i, t in enumerate(templated) for j, label in enumerate(labels))


def test_no_template_and_templates_exclude_each_other(saved_tiny_model, images, capsys):
    with pytest.raises(SystemExit) as info:
        main(["classify", images[0], "--model", str(saved_tiny_model), "--labels", "a,b", "--no-template",
              "--templates", "openai"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err
