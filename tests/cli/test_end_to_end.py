"""Train a model with ``clipforge train``, then use it through every command: ``classify``, ``explain`` and
each ``eval`` task, on built-in images of colour-shape pairs the model never saw in training."""
import json

import pytest

from clipforge.cli import main
from clipforge.data import ShapesDataset, class_names, write_classification, write_shapes

UNSEEN = class_names("heldout")  # 8 colour-shape pairs absent from training: chance is 1/8


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    return {"test": write_classification(root / "test", "heldout", 96, seed=11),
            "train": write_classification(root / "train", "heldout", 96, seed=12),
            "shifted": write_classification(root / "shifted", "heldout", 96, seed=13, image_size=48),
            "captions": write_shapes(root / "captions", 64, split="all", fmt="csv", seed=14)}


def _eval(model, tmp_path, *args):
    output = tmp_path / "result.json"
    assert main(["eval", "--model", str(model), "--output", str(output), *args]) == 0
    return json.loads(output.read_text())["metrics"]


@pytest.mark.slow
def test_zeroshot_transfers_to_unseen_pairs(trained_tiny_model, heldout, tmp_path):
    metrics = _eval(trained_tiny_model, tmp_path, "--task", "zeroshot", "--data", heldout["test"])
    assert metrics["top1"] > 0.5 and metrics["mean_per_class_recall"] > 0.5


def test_linear_probe_and_retrieval_beat_chance(trained_tiny_model, heldout, tmp_path):
    probe = _eval(trained_tiny_model, tmp_path, "--task", "linear-probe", "--data", heldout["test"],
                  "--train-data", heldout["train"])
    assert probe["top1"] > 0.5
    retrieval = _eval(trained_tiny_model, tmp_path, "--task", "retrieval", "--data", heldout["captions"])
    assert retrieval["image_to_text_recall@10"] > 3 * 10 / 64  # chance at K=10 of 64 is 10/64
    assert retrieval["text_to_image_recall@10"] > 3 * 10 / 64


def test_robustness_over_a_shifted_copy(trained_tiny_model, heldout, tmp_path):
    metrics = _eval(trained_tiny_model, tmp_path, "--task", "robustness", "--data", heldout["test"],
                    "--shifted", f"small={heldout['shifted']}")
    assert metrics["top1"] > 0.5 and metrics["small/top1"] > 0.25
    assert metrics["small/drop"] == pytest.approx(metrics["top1"] - metrics["small/top1"])


def test_classify_names_the_unseen_pair(trained_tiny_model, tmp_path, capsys):
    data = ShapesDataset(16, "heldout", seed=21)
    paths = []
    for i in range(len(data)):
        paths.append(tmp_path / f"{i}.png")
        data.image(i).save(paths[-1])
    assert main(["classify", *map(str, paths), "--model", str(trained_tiny_model), "--labels", ",".join(UNSEEN),
                 "--top-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, paths))
    correct = sum(r["predictions"][0]["label"] == data.class_name(i, "pair") for i, r in enumerate(results))
    assert correct >= 10  # of 16; chance is 2


def test_explain_plots_the_trained_model(trained_tiny_model, tmp_path, capsys):
    data = ShapesDataset(3, "heldout", seed=22)
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        data.image(i).save(path)
    texts = [f"a photo of a {data.class_name(i, 'pair')}." for i in range(3)]
    assert main(["explain", *map(str, paths), "--model", str(trained_tiny_model), "--texts", *texts,
                 "--output", str(tmp_path / "explain.png")]) == 0
    assert (tmp_path / "explain.png").stat().st_size > 10_000
    assert "cosine" in capsys.readouterr().out
