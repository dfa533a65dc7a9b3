"""``clipforge classify`` end to end through ``clipforge.cli.main`` on a saved tiny model and built-in shapes."""
import json
from pathlib import Path

import pytest
import torch

from clipforge.cli import main
from clipforge.data.shapes import write_classification
from clipforge.io.factory import load
from clipforge.transforms import load_image
from clipforge.zeroshot import ZeroShotClassifier

LABELS = "red shape,blue shape,green shape"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_classification(tmp_path_factory.mktemp("shapes") / "val", split="all", num_samples=8,
                                  by="colour", fmt="folder")
    return [str(p) for p in sorted(Path(folder).rglob("*.png"))[:3]]


def classify_json(capsys, model, images, *extra):
    assert main(["classify", *images, "--model", str(model), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_output_lists_top_labels_per_image(saved_tiny_model, images, capsys):
    assert main(["classify", *images, "--model", str(saved_tiny_model), "--labels", LABELS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and len(lines) == 3 * 4  # a path line, then 3 labels (top-k capped at 3)
    percents = [float(line.split("%")[0]) for line in lines[1:4]]
    assert percents == sorted(percents, reverse=True) and sum(percents) == pytest.approx(100, abs=0.05)
    assert {line.split("%  ")[1] for line in lines[1:4]} == set(LABELS.split(","))


def test_json_matches_the_library_classifier(saved_tiny_model, images, capsys):
    out = classify_json(capsys, saved_tiny_model, images, "--labels", LABELS, "--top-k", "2")
    assert [item["image"] for item in out] == images
    model, preprocess = load(saved_tiny_model)  # the CLI's default device, so the same arithmetic
    classifier = ZeroShotClassifier(model, LABELS.split(","))
    expected = classifier.predict(torch.stack([preprocess(load_image(p)) for p in images]), top_k=2)
    for item, preds in zip(out, expected):
        assert [p["label"] for p in item["predictions"]] == [label for label, _ in preds]
        assert [p["probability"] for p in item["predictions"]] == pytest.approx([p for _, p in preds], abs=1e-6)


def test_classes_and_templates_from_files(saved_tiny_model, images, tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("red shape\nblue shape\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na drawing of the {c}.\n")
    out = classify_json(capsys, saved_tiny_model, images, "--classes", str(tmp_path / "classes.txt"),
                        "--templates", str(tmp_path / "templates.txt"))
    assert all(len(item["predictions"]) == 2 for item in out)
    assert all(sum(p["probability"] for p in item["predictions"]) == pytest.approx(1.0) for item in out)
    assert len(classify_json(capsys, saved_tiny_model, images[:1], "--labels", "dog,cat", "--templates", "openai"))


def test_multi_label_scores_each_label_on_its_own(saved_tiny_model, images, capsys):
    both = classify_json(capsys, saved_tiny_model, images, "--labels", LABELS, "--multi-label")
    alone = classify_json(capsys, saved_tiny_model, images, "--labels", "red shape", "--multi-label")
    for many, one in zip(both, alone):
        scores = {p["label"]: p["probability"] for p in many["predictions"]}
        assert len(scores) == 3 and all(0 < s < 1 for s in scores.values())
        assert scores["red shape"] == pytest.approx(one["predictions"][0]["probability"], abs=1e-6)


def test_unreadable_images_are_skipped_and_exit_status(saved_tiny_model, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    out = classify_json(capsys, saved_tiny_model, [images[0], str(broken), str(tmp_path / "missing.png")],
                        "--labels", LABELS)
    assert [item["image"] for item in out] == [images[0]]
    assert main(["classify", str(broken), "--model", str(saved_tiny_model), "--labels", LABELS]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err and "none of the 1 images could be read" in err


@pytest.mark.parametrize("args, message", [
    (["--labels", "a dog,,a cat"], "class 2 is an empty string"),
    (["--labels", "a dog,a cat,a dog"], "'a dog' appears twice"),
    (["--labels", "a dog", "--templates", "no placeholder here"], "not a template set"),
    (["--labels", "a dog", "--top-k", "0"], "--top-k must be at least 1"),
])
def test_bad_input_exits_2_with_a_message(saved_tiny_model, images, args, message, capsys):
    assert main(["classify", images[0], "--model", str(saved_tiny_model), *args]) == 2
    assert message in capsys.readouterr().err


def test_template_file_without_placeholder(saved_tiny_model, images, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a photo of a {}.\na photo\n")
    assert main(["classify", images[0], "--model", str(saved_tiny_model), "--labels", "a dog",
                 "--templates", str(tmp_path / "t.txt")]) == 2
    assert "template 2 'a photo' has no class placeholder" in capsys.readouterr().err
