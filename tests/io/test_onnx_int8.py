"""The int8 ONNX export (``export_onnx(..., int8=True)``, ``clipforge export onnx --int8``): a folder like the float32
one, read by plain ONNX Runtime, its features within the stated cosine of PyTorch's float32 ones."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'clipforge[onnx]')")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli import main  # noqa: E402
from clipforge.io.hf import hf_tokenizer_files  # noqa: E402
from clipforge.io.onnx import FORMAT, IMAGE_FILE, INT8_MIN_COSINE, META_FILE, TEXT_FILE, OnnxEncoder, describe, \
    example_images, example_tokens, export_onnx  # noqa: E402


@pytest.fixture(scope="module", params=["tiny-vit", pytest.param("tiny-rn", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    """(float32 model, its int8 export folder) of one architecture's seed-0 weights (about 2 s)."""
    model, _ = clipforge.load(request.param, random_init=True, device="cpu")
    folder = tmp_path_factory.mktemp(f"{request.param}-int8")
    export_onnx(model, folder, int8=True)
    return model, folder


@pytest.mark.slow
def test_the_int8_folder_describes_itself_like_the_float32_one(exported):
    model, int8 = exported
    expected_files = {IMAGE_FILE, TEXT_FILE, META_FILE, *hf_tokenizer_files(model.context_length)}
    assert {p.name for p in int8.iterdir()} == expected_files  # no leftover float32 graphs
    meta = json.loads((int8 / META_FILE).read_text())
    assert meta["precision"] == "int8"
    assert meta["quantization"]["method"] == "onnxruntime.quantization.quantize_dynamic"
    assert all(INT8_MIN_COSINE <= cos < 1 for cos in meta["min_cosine"].values())
    # what a float32 export says: format, model config, preprocessing, tokenizer, logit scale
    assert {key: meta[key] for key in describe(model)} == json.loads(json.dumps(describe(model)))
    assert meta["format"] == FORMAT and meta["model_cfg"] == model.config.to_dict()
    for name in (IMAGE_FILE, TEXT_FILE):
        props = {p.key: p.value for p in onnx.load(str(int8 / name), load_external_data=False).metadata_props}
        assert json.loads(props["precision"]) == "int8"
        assert json.loads(props["model_cfg"]) == model.config.to_dict()


def test_only_the_blocks_and_attention_pool_products_are_quantised(exported):
    model, int8 = exported
    for name in (IMAGE_FILE, TEXT_FILE):
        nodes = onnx.load(str(int8 / name)).graph.node
        quantised = [node.name for node in nodes if node.op_type == "MatMulInteger"]
        assert quantised and all("/resblocks" in n or "/attnpool/" in n for n in quantised)
        assert "/attnpool/c_proj" not in " ".join(quantised)  # the projection into the joint space stays float
    float_bytes = 4 * sum(p.numel() for p in model.visual.parameters())
    assert (int8 / IMAGE_FILE).stat().st_size < 0.6 * float_bytes  # the blocks' weights take a quarter


def test_plain_onnxruntime_reads_the_int8_graphs(exported):
    model, int8 = exported
    images, tokens = example_images(model.config, 3, seed=5), example_tokens(model.config, 3, seed=5)
    sessions = {name: onnxruntime.InferenceSession(str(int8 / name), providers=["CPUExecutionProvider"])
                for name in (IMAGE_FILE, TEXT_FILE)}
    outputs = {"image": sessions[IMAGE_FILE].run(None, {"images": images.numpy()})[0],
               "text": sessions[TEXT_FILE].run(None, {"tokens": tokens.numpy()})[0]}
    with torch.inference_mode():
        expected = {"image": model.encode_image(images), "text": model.encode_text(tokens)}
    for tower in ("image", "text"):
        assert F.cosine_similarity(torch.from_numpy(outputs[tower]), expected[tower]).min() >= INT8_MIN_COSINE
    encoder = OnnxEncoder(int8, threads=1)  # and clipforge's reader, which cuts rows after end-of-text
    assert F.cosine_similarity(encoder.encode_text(tokens), expected["text"]).min() >= INT8_MIN_COSINE


def test_an_int8_pytorch_model_is_not_exported_twice_quantised(tmp_path):
    model, _ = clipforge.load("tiny-vit", random_init=True, precision="int8")
    with pytest.raises(ValueError, match="already int8.*int8=True"):
        export_onnx(model, tmp_path)


@pytest.mark.slow
def test_cli_exports_int8_and_says_how_close_it_is(tmp_path, capsys):
    out = tmp_path / "onnx-int8"
    assert main(["export", "onnx", "--model", "tiny-vit", "--random-init", "--int8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lowest cosine to PyTorch's float32" in printed
    assert json.loads((out / META_FILE).read_text())["precision"] == "int8"
    hf = ["export", "hf", "--model", "tiny-vit", "--random-init", "--int8", "--output", str(tmp_path / "hf")]
    assert main(hf) == 2
    assert "--int8 applies to the onnx format only" in capsys.readouterr().err
