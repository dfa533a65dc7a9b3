"""``--precision int8`` for ``clipforge classify`` and ``clipforge eval``: the int8 model's answers beside fp32's."""
import json
from pathlib import Path

import pytest
import torch

from clipforge.cli import main
from clipforge.data.shapes import write_classification
from clipforge.io.factory import load
from clipforge.models.quantize import is_int8
from clipforge.transforms import load_image
from clipforge.zeroshot import ZeroShotClassifier

LABELS = "red shape,blue shape,green shape,yellow shape"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A labelled folder of 24 built-in shapes (8 colours): the classify and eval inputs."""
    return write_classification(tmp_path_factory.mktemp("shapes") / "val", split="all", num_samples=24,
                                by="colour", fmt="folder")


def _classify(capsys, model, images, precision):
    assert main(["classify", *images, "--model", str(model), "--labels", LABELS, "--json",
                 "--precision", precision]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_classify_int8_is_the_library_int8_model_and_close_to_fp32(saved_tiny_model, data, capsys):
    images = [str(p) for p in sorted(Path(data).rglob("*.png"))[:4]]
    int8, fp32 = (_classify(capsys, saved_tiny_model, images, precision) for precision in ("int8", "fp32"))
    model, preprocess = load(saved_tiny_model, precision="int8")
    assert is_int8(model)
    expected = ZeroShotClassifier(model, LABELS.split(",")).predict(
        torch.stack([preprocess(load_image(p)) for p in images]), top_k=4)
    for item, preds, reference in zip(int8, expected, fp32):
        assert [(p["label"], p["probability"]) for p in item["predictions"]] == \
            [(label, pytest.approx(p, abs=1e-6)) for label, p in preds]
        probabilities = {p["label"]: p["probability"] for p in reference["predictions"]}
        assert all(p["probability"] == pytest.approx(probabilities[p["label"]], abs=0.02) for p in item["predictions"])


@pytest.mark.slow
def test_eval_int8_beside_fp32(saved_tiny_model, data, tmp_path, capsys):
    metrics = {}
    for precision in ("fp32", "int8"):
        output = tmp_path / f"{precision}.json"
        assert main(["eval", "--model", str(saved_tiny_model), "--task", "zeroshot", "--data", data,
                     "--precision", precision, "--output", str(output)]) == 0
        metrics[precision] = json.loads(output.read_text())["metrics"]
    capsys.readouterr()
    assert set(metrics["int8"]) == set(metrics["fp32"])
    # 24 images: at most one prediction changes between the two precisions
    assert abs(metrics["int8"]["top1"] - metrics["fp32"]["top1"]) <= 1 / 24 + 1e-9


def test_int8_on_a_gpu_is_a_clear_error(saved_tiny_model, data, capsys):
    image = str(next(Path(data).rglob("*.png")))
    assert main(["classify", image, "--model", str(saved_tiny_model), "--labels", LABELS,
                 "--precision", "int8", "--device", "cuda"]) == 2
    assert "CPU only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(saved_tiny_model), "--task", "zeroshot", "--data", data, "--precision", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
