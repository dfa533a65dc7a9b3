"""Parity with Hugging Face ``transformers.CLIPModel`` on the same random weights, both directions."""
import json

import pytest
import torch
from safetensors.torch import load_file

import clipforge
from clipforge.io.checkpoints import read_checkpoint
from clipforge.io.hf import export_hf
from clipforge.io.tensors import CheckpointError
from clipforge.models import CLIP, get_model_config
from clipforge.tokenizer import tokenize

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat", "a diagram", "two dogs playing in the snow at night"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random HF CLIPModel (real vocabulary, QuickGELU) saved with ``save_pretrained``."""
    torch.manual_seed(0)
    tower = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "hidden_act": "quick_gelu"}
    config = transformers.CLIPConfig(
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=32)
    model = transformers.CLIPModel(config)
    with torch.no_grad():  # HF initialises LayerNorms to the identity: make them matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("hf") / "clip"
    model.save_pretrained(folder)
    return folder


def _hf_outputs(model, images, tokens):
    with torch.no_grad():
        out = model(input_ids=tokens, pixel_values=images)
    return out.image_embeds, out.text_embeds, out.logits_per_image  # embeds are L2-normalised


def _our_outputs(model: CLIP, images, tokens):
    with torch.no_grad():
        return (model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True),
                model(images, tokens)[0])


def _assert_parity(ours, theirs):
    for a, b, what in zip(ours, theirs, ("image features", "text features", "logits_per_image")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _raw_features_match(hf_model, model: CLIP, images, tokens):
    with torch.no_grad():
        hf_image = hf_model.get_image_features(pixel_values=images).pooler_output
        hf_text = hf_model.get_text_features(input_ids=tokens).pooler_output
        torch.testing.assert_close(model.encode_image(images), hf_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), hf_text, atol=1e-5, rtol=1e-5)


def test_hf_folder_loads_with_the_same_outputs(hf_folder):
    hf_model = transformers.CLIPModel.from_pretrained(hf_folder).eval()
    model, preprocess = clipforge.load(hf_folder, device="cpu")
    assert model.config.quick_gelu and model.config.vision_cfg.heads == 2 and model.config.text_cfg.heads == 2
    assert preprocess.config.image_size == 32
    images, tokens = torch.randn(4, 3, 32, 32), tokenize(TEXTS)
    _assert_parity(_our_outputs(model, images, tokens), _hf_outputs(hf_model, images, tokens))
    _raw_features_match(hf_model, model, images, tokens)


def test_hf_pytorch_model_bin_and_bare_weights_file(hf_folder, tmp_path):
    reference = read_checkpoint(hf_folder).state_dict
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    torch.save(load_file(hf_folder / "model.safetensors"), folder / "pytorch_model.bin")
    for path in (folder, hf_folder / "model.safetensors"):  # a folder with .bin; a bare HF weights file
        state_dict = read_checkpoint(path).state_dict
        assert state_dict.keys() == reference.keys()
        assert all(torch.equal(state_dict[k], reference[k]) for k in reference)


@pytest.mark.parametrize("source", ["hf", "tiny-vit"])
def test_export_to_hf_gives_the_same_outputs(hf_folder, tmp_path, source):
    if source == "hf":
        model, _ = clipforge.load(hf_folder, device="cpu")  # QuickGELU, from HF and back
    else:
        torch.manual_seed(0)
        model = CLIP(get_model_config("tiny-vit")).eval()  # exact GELU, context length 32
    export_hf(model, tmp_path / "exported")
    meta = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert meta["text_config"]["eos_token_id"] == 49407 and meta["text_config"]["bos_token_id"] == 49406
    assert meta["vision_config"]["hidden_act"] == ("quick_gelu" if source == "hf" else "gelu")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path / "exported").eval()
    images, tokens = torch.randn(3, 3, 32, 32), tokenize(TEXTS, context_length=model.context_length)
    _assert_parity(_our_outputs(model, images, tokens), _hf_outputs(hf_model, images, tokens))
    _raw_features_match(hf_model, model, images, tokens)
    reloaded, _ = clipforge.load(tmp_path / "exported", device="cpu")
    assert reloaded.config == model.config


@pytest.mark.parametrize("name,what", [("tiny-rn", "ResNet"), ("tiny-vit-cbow", "'cbow' text encoder")])
def test_export_without_hf_equivalent_is_refused(tmp_path, name, what):
    with pytest.raises(ValueError, match=f"cannot export a {what}"):
        export_hf(CLIP(get_model_config(name)), tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_unsupported_hf_config_is_named(hf_folder, tmp_path):
    folder = tmp_path / "relu"
    folder.mkdir()
    meta = json.loads((hf_folder / "config.json").read_text())
    meta["text_config"]["hidden_act"] = meta["vision_config"]["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(meta))
    (folder / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"relu/config.json.*hidden_act \['relu'\] is not supported"):
        clipforge.load(folder, device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="relu.*no weights file.*pytorch_model.bin"):
        clipforge.load(folder, device="cpu")
