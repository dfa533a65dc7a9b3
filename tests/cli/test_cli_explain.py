"""``clipforge explain``: the similarity report's arithmetic, its text and its PNG heatmap."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.data.shapes import write_classification
from clipforge.evaluate.explain import similarity_report
from clipforge.io.factory import load
from clipforge.tokenizer import tokenize
from clipforge.transforms import load_image

TEXTS = ["a red shape", "a blue shape", "a photo of a dog"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_classification(tmp_path_factory.mktemp("shapes") / "val", split="all", num_samples=8,
                                  by="colour", fmt="folder")
    return [str(p) for p in sorted(Path(folder).rglob("*.png"))[:2]]


def test_report_matches_the_model_forward(saved_tiny_model, images):
    model, preprocess = load(saved_tiny_model, device="cpu")
    batch = torch.stack([preprocess(load_image(p)) for p in images])
    report = similarity_report(model, batch, TEXTS, images)
    logits_per_image, _ = model(batch, tokenize(TEXTS, context_length=model.context_length))
    torch.testing.assert_close(report.logits, logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(report.probabilities.sum(dim=1), torch.ones(2))
    assert report.chosen == logits_per_image.argmax(dim=1).tolist()
    assert report.cosine.abs().max() <= 1.0


def test_explain_prints_and_plots(saved_tiny_model, images, tmp_path, capsys):
    output = tmp_path / "figures" / "explain.png"
    assert main(["explain", *images, "--texts", *TEXTS, "--model", str(saved_tiny_model),
                 "--output", str(output)]) == 0
    out = capsys.readouterr().out
    for fragment in ("cosine similarity", "logits =", "softmax over the texts", "chosen text:",
                     "L2-normalised", "cosine of the angle", "texts you supplied", f"wrote {output}"):
        assert fragment in out
    with Image.open(output) as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 300


def test_texts_file_and_bad_texts(saved_tiny_model, images, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("a red shape\n\na blue shape\n")
    assert main(["explain", images[0], "--texts-file", str(tmp_path / "texts.txt"),
                 "--model", str(saved_tiny_model)]) == 0
    assert "a blue shape" in capsys.readouterr().out
    assert main(["explain", images[0], "--texts", "a dog", " ", "--model", str(saved_tiny_model)]) == 2
    assert "non-empty texts" in capsys.readouterr().err
