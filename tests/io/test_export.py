"""ONNX export (clipforge.io.onnx) and the ``clipforge export`` command: ONNX Runtime vs PyTorch features."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'clipforge[onnx]')")

from clipforge.cli import main  # noqa: E402
from clipforge.io.onnx import IMAGE_FILE, META_FILE, TEXT_FILE, OnnxEncoder, example_images, example_tokens, \
    export_onnx  # noqa: E402
from clipforge.models import CLIP, get_model_config  # noqa: E402

ATOL = 1e-4


def _model(name: str) -> CLIP:
    torch.manual_seed(0)
    return CLIP(get_model_config(name)).eval()


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def exported(request, tmp_path_factory):
    model = _model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    paths = export_onnx(model, folder)
    return model, folder, paths


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.slow
def test_export_writes_both_graphs_and_config(exported):
    model, folder, paths = exported
    assert paths["image"] == folder / IMAGE_FILE and paths["text"] == folder / TEXT_FILE
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["model_cfg"] == model.config.to_dict()
    assert set(meta["max_difference"]) == {"image", "text"}
    assert max(meta["max_difference"].values()) < ATOL


@pytest.mark.parametrize("batch", [1, 5])
def test_image_features_match_pytorch(exported, batch):
    model, folder, _ = exported
    encoder = OnnxEncoder(folder)
    images = example_images(model.config, batch, seed=7)
    with torch.inference_mode():
        expected = model.encode_image(images)
        expected_unit = model.encode_image(images, normalize=True)
    assert encoder.encode_image(images).shape == expected.shape
    assert _max_diff(encoder.encode_image(images), expected) < ATOL * max(1.0, expected.abs().max().item())
    assert _max_diff(encoder.encode_image(images.numpy(), normalize=True), expected_unit) < ATOL


@pytest.mark.parametrize("batch", [1, 4])
def test_text_features_match_pytorch(exported, batch):
    model, folder, _ = exported
    encoder = OnnxEncoder(folder, threads=1)
    tokens = example_tokens(model.config, batch, seed=3)
    with torch.inference_mode():
        expected = model.encode_text(tokens)
    assert _max_diff(encoder.encode_text(tokens), expected) < ATOL * max(1.0, expected.abs().max().item())


def test_text_graph_takes_any_length_and_stops_at_the_last_end_of_text(exported):
    model, folder, _ = exported
    encoder = OnnxEncoder(folder)
    assert isinstance(encoder._sessions["text"].get_inputs()[0].shape[1], str)  # a dynamic axis
    tokens = torch.tensor([[49406, 320, 1125, 539, 49407], [49406, 1929, 49407, 0, 0]])
    padded = torch.nn.functional.pad(tokens, (0, model.context_length - tokens.shape[1]))
    with torch.inference_mode():
        expected = model.encode_text(padded, normalize=True)
    for rows in (tokens, padded, tokens[:, :5]):
        assert _max_diff(encoder.encode_text(rows, normalize=True), expected) < ATOL


def test_a_fixed_length_text_graph_still_works(exported, tmp_path):
    """Exports made before the length axis was dynamic: short rows are padded to the graph's length."""
    import shutil

    from clipforge.io.onnx import _Encoder, _export
    model, folder, _ = exported
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    _export(_Encoder(model, "text"), example_tokens(model.config, 2), "tokens", tmp_path / TEXT_FILE, 17)
    encoder = OnnxEncoder(tmp_path)
    assert encoder._sessions["text"].get_inputs()[0].shape[1] == model.context_length
    tokens = torch.tensor([[49406, 320, 1125, 539, 49407], [49406, 1929, 49407, 0, 0]])
    with torch.inference_mode():
        expected = model.encode_text(tokens, normalize=True)
    assert _max_diff(encoder.encode_text(tokens, normalize=True), expected) < ATOL


def test_bad_inputs_are_rejected_with_clear_errors(exported, tmp_path):
    model, folder, _ = exported
    encoder = OnnxEncoder(folder)
    with pytest.raises(ValueError, match=f"preprocess them to {model.image_size} px"):
        encoder.encode_image(torch.zeros(1, 3, model.image_size + 8, model.image_size + 8))
    with pytest.raises(ValueError, match="length <="):
        encoder.encode_text(torch.zeros(1, model.context_length + 1, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="not an ONNX export folder"):
        OnnxEncoder(tmp_path)


@pytest.mark.slow
def test_export_leaves_the_model_as_it_was(tmp_path):
    model = _model("tiny-vit").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path, verify=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_cli_exports_a_saved_checkpoint(tmp_path, capsys):
    from clipforge import save
    model = _model("tiny-vit-cbow")
    save(model, tmp_path / "ckpt")
    assert main(["export", "onnx", "--model", str(tmp_path / "ckpt"), "--output", str(tmp_path / "onnx")]) == 0
    assert "verified with ONNX Runtime" in capsys.readouterr().out
    tokens = example_tokens(model.config, 2)
    with torch.inference_mode():
        expected = model.encode_text(tokens)
    assert _max_diff(OnnxEncoder(tmp_path / "onnx").encode_text(tokens), expected) < ATOL


def test_cli_needs_random_init_for_an_architecture_without_weights(tmp_path, capsys):
    assert main(["export", "onnx", "--model", "tiny-vit", "--output", str(tmp_path)]) == 2
    assert "--random-init" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert "neither an existing file" in capsys.readouterr().err


def test_cli_exports_hugging_face_folder(tmp_path):
    assert main(["export", "hf", "--model", "tiny-vit", "--random-init", "--output", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    assert (tmp_path / "model.safetensors").is_file()
