"""``clipforge eval`` end to end for every task on built-in shapes data, and the CLIP_benchmark loader."""
import csv
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.cli import main
from clipforge.data.shapes import write_classification, write_shapes
from clipforge.evaluate.benchmark_loader import load_clipforge, register_with_clip_benchmark
from clipforge.zeroshot import build_zeroshot_classifier

NUM_COLOURS = 8  # the built-in data's colours: zero-shot/linear-probe chance is 1/8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    sets = {fmt: write_classification(root / fmt, split="all", num_samples=32, by="colour", fmt=fmt)
            for fmt in ("folder", "wds", "csv")}
    sets["train"] = write_classification(root / "train", split="all", num_samples=96, by="colour", seed=5)
    sets["captions"] = write_shapes(root / "captions", 12, split="train", fmt="csv")
    sets["karpathy"] = _karpathy_json(Path(sets["captions"]), root / "karpathy.json")
    return {k: str(v) for k, v in sets.items()}


def _karpathy_json(caption_csv: Path, output: Path) -> Path:
    with open(caption_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    images = [{"filepath": str(Path(r["filepath"]).parent), "filename": Path(r["filepath"]).name,
               "split": "test" if i < 8 else "train", "sentences": [{"raw": r["caption"]}, {"raw": "a shape"}]}
              for i, r in enumerate(rows)]
    output.write_text(json.dumps({"images": images}))
    return output


def run_eval(model, tmp_path, capsys, *args):
    output = tmp_path / "results.json"
    assert main(["eval", "--model", str(model), *args, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(output.read_text())
    assert all(0.0 <= v <= 1.0 for k, v in result["metrics"].items() if not k.endswith("/drop"))
    for name, value in result["metrics"].items():
        assert f"{name}" in printed and f"{value:.4f}" in printed  # the printed table
    return result


def test_zeroshot_gives_the_same_metrics_from_folder_webdataset_and_csv(saved_tiny_model, data, tmp_path, capsys):
    root = Path(data["folder"])
    common = ["--task", "zeroshot", "--templates", str(root / "templates.txt")]
    folder = run_eval(saved_tiny_model, tmp_path, capsys, *common, "--data", data["folder"])
    assert set(folder["metrics"]) == {"top1", "top5", "mean_per_class_recall"}
    assert folder["task"] == "zeroshot" and folder["details"]["num_images"] == 32
    wds = run_eval(saved_tiny_model, tmp_path, capsys, *common, "--data", data["wds"],
                   "--classnames", str(Path(data["wds"]).parent / "classnames.txt"))
    table = run_eval(saved_tiny_model, tmp_path, capsys, *common, "--data", data["csv"])
    for other in (wds, table):  # the same 32 images and class names, whatever the format
        assert other["metrics"] == pytest.approx(folder["metrics"], abs=1e-6)


def test_retrieval_from_csv_and_karpathy_json(saved_tiny_model, data, tmp_path, capsys):
    names = {f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    from_csv = run_eval(saved_tiny_model, tmp_path, capsys, "--task", "retrieval", "--data", data["captions"])
    assert set(from_csv["metrics"]) == names and from_csv["details"]["num_images"] == 12
    karpathy = run_eval(saved_tiny_model, tmp_path, capsys, "--task", "retrieval", "--data", data["karpathy"],
                        "--split", "test", "--image-root", str(Path(data["captions"]).parent))
    assert set(karpathy["metrics"]) == names
    assert (karpathy["details"]["num_images"], karpathy["details"]["num_captions"]) == (8, 16)


@pytest.mark.slow
def test_linear_probe_beats_chance_on_builtin_data(saved_tiny_model, data, tmp_path, capsys):
    result = run_eval(saved_tiny_model, tmp_path, capsys, "--task", "linear-probe", "--data", data["folder"],
                      "--train-data", data["train"])
    assert result["metrics"]["top1"] > 2.5 / NUM_COLOURS  # colour is linearly readable from random ViT features
    assert 1e-6 <= result["details"]["l2"] <= 1e6
    few = run_eval(saved_tiny_model, tmp_path, capsys, "--task", "linear-probe", "--data", data["folder"],
                   "--train-data", data["train"], "--k-shot", "2", "--seed", "1")
    assert few["details"]["num_train"] <= 2 * NUM_COLOURS


def test_robustness_reports_shifted_sets(saved_tiny_model, data, tmp_path, capsys):
    result = run_eval(saved_tiny_model, tmp_path, capsys, "--task", "robustness", "--data", data["folder"],
                      "--shifted", f"table={data['csv']}", f"other={data['train']}")
    metrics = result["metrics"]
    assert set(metrics) == {"top1", "table/top1", "table/drop", "other/top1", "other/drop", "mean_shifted_top1"}
    assert metrics["table/drop"] == pytest.approx(0.0, abs=1e-6)  # the same images, matched by class name
    assert metrics["other/drop"] == pytest.approx(metrics["top1"] - metrics["other/top1"])


def test_unreadable_image_is_reported(saved_tiny_model, data, tmp_path, capsys):
    root = tmp_path / "val"
    for i, colour in enumerate(("red_shape", "blue_shape")):
        (root / colour).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200 * (1 - i), 0, 200 * i)).save(root / colour / "a.png")
    (root / "red_shape" / "bad.png").write_text("garbage")
    output = tmp_path / "results.json"
    assert main(["eval", "--model", str(saved_tiny_model), "--task", "zeroshot", "--data", str(root),
                 "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 of 3 images" in err and "bad.png" in err
    details = json.loads(output.read_text())["details"]
    assert details["num_skipped_images"] == 1 and details["num_images"] == 2


@pytest.mark.parametrize("args, message", [
    (["--task", "zeroshot", "--data", "{empty}"], "no class folders"),
    (["--task", "zeroshot", "--data", "{missing}"], "does not exist"),
    (["--task", "linear-probe", "--data", "{folder}"], "needs --train-data"),
    (["--task", "zeroshot", "--data", "{folder}", "--k-shot", "3"], "--k-shot does not apply to --task zeroshot"),
    (["--task", "robustness", "--data", "{folder}", "--shifted", "nameless"], "expected NAME=PATH"),
    (["--task", "zeroshot", "--data", "{folder}", "--templates", "{bad_templates}"], "has no class placeholder"),
])
def test_bad_input_exits_2_with_a_message(saved_tiny_model, data, tmp_path, args, message, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.txt").write_text("a photo of\n")
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "folder": data["folder"],
             "bad_templates": tmp_path / "bad.txt"}
    args = [a.format(**paths) for a in args]
    assert main(["eval", "--model", str(saved_tiny_model), *args]) == 2
    assert message in capsys.readouterr().err


def test_clip_benchmark_loader_returns_a_working_triple(saved_tiny_model, data):
    model, transform, tokenizer = load_clipforge(str(saved_tiny_model), "none", None, "cpu")
    image = Image.open(next(Path(data["folder"]).rglob("*.png")))
    features = model.encode_image(transform(image).unsqueeze(0))
    assert features.shape == (1, 128) and not model.training
    # CLIP_benchmark's zero-shot classifier, step by step: format {c}, tokenize, encode, normalise, average
    classes, templates = ["red shape", "blue shape"], ["a photo of a {c}.", "a drawing of the {c}."]
    columns = [F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c=c) for t in templates])), dim=-1)
                           .mean(dim=0), dim=0) for c in classes]
    torch.testing.assert_close(torch.stack(columns, dim=1), build_zeroshot_classifier(model, classes, templates))
    by_arch, _, _ = load_clipforge("tiny-vit", str(saved_tiny_model), None, "cpu")
    torch.testing.assert_close(by_arch.encode_image(transform(image).unsqueeze(0)), features)


def test_register_with_clip_benchmark(monkeypatch):
    package = types.ModuleType("clip_benchmark")
    models = types.ModuleType("clip_benchmark.models")
    models.TYPE2FUNC, models.MODEL_TYPES = {"open_clip": object()}, ["open_clip"]
    monkeypatch.setitem(sys.modules, "clip_benchmark", package)
    monkeypatch.setitem(sys.modules, "clip_benchmark.models", models)
    register_with_clip_benchmark()
    register_with_clip_benchmark()
    assert models.TYPE2FUNC["clipforge"] is load_clipforge and models.MODEL_TYPES == ["open_clip", "clipforge"]
