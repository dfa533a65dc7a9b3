"""OpenCLIP users: its model names and their activations, its forward contract, and clipforge folders that
OpenCLIP's ``local-dir:`` loader reads (checked against OpenCLIP 3.3's schema: OpenCLIP needs torchvision,
so it is not a test dependency).
"""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.io import pretrained
from clipforge.loss import contrastive_loss
from clipforge.models import get_model_config, list_models

# Field names of OpenCLIP 3.3's CLIPVisionCfg, CLIPTextCfg, CLIP.__init__ and PreprocessCfg (open_clip/model.py,
# open_clip/transform.py): a key outside these makes OpenCLIP's create_model raise.
OPEN_CLIP_VISION_KEYS = {
    "act_kwargs", "attentional_pool", "attn_pooler_heads", "attn_pooler_queries", "block_type",
    "final_ln_after_pool", "head_width", "image_size", "layers", "ls_init_value", "mlp_ratio", "no_ln_pre",
    "norm_kwargs", "output_tokens", "patch_dropout", "patch_size", "pool_type", "pos_embed_type", "qk_norm",
    "scale_attn", "scale_attn_inner", "scale_fc", "scale_heads", "scaled_cosine_attn", "timm_drop",
    "timm_drop_path", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
    "width"}
OPEN_CLIP_TEXT_KEYS = {
    "act_kwargs", "block_type", "context_length", "embed_cls", "eos_id", "final_ln_after_pool", "heads",
    "hf_model_name", "hf_model_pretrained", "hf_pooler_type", "hf_proj_type", "hf_tokenizer_name", "layers",
    "ls_init_value", "mlp_ratio", "no_causal_mask", "norm_kwargs", "output_tokens", "pad_id", "pool_type",
    "proj_bias", "proj_type", "qk_norm", "scale_attn", "scale_attn_inner", "scale_fc", "scale_heads",
    "scaled_cosine_attn", "tokenizer_kwargs", "tokenizer_mode", "vocab_size", "width"}
OPEN_CLIP_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                        "nonscalar_logit_scale", "cast_dtype", "output_dict"}
OPEN_CLIP_PREPROCESS_KEYS = {"fill_color", "interpolation", "mean", "mode", "resize_mode", "size", "std"}
# OpenCLIP's factory._find_checkpoint_in_dir: the weights file names a local-dir: folder is searched for.
OPEN_CLIP_LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                               "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                               "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# OpenCLIP 3.3's model_configs: ViT-B-32 and the other names without a suffix are GELU models.
OPEN_CLIP_GELU = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14"]


@pytest.mark.parametrize("name", OPEN_CLIP_GELU)
def test_open_clip_names_mean_open_clips_activation(name):
    assert get_model_config(name).quick_gelu is False
    if f"{name}-quickgelu" in list_models():
        quick = get_model_config(f"{name}-quickgelu")
        assert quick.quick_gelu is True and quick.replace(quick_gelu=False) == get_model_config(name)


@pytest.mark.parametrize("openai, registry", [("ViT-B/32", "ViT-B-32-quickgelu"), ("ViT-B/16", "ViT-B-16-quickgelu"),
                                              ("ViT-L/14", "ViT-L-14-quickgelu"),
                                              ("ViT-L/14@336px", "ViT-L-14-336-quickgelu"), ("RN50", "RN50"),
                                              ("RN50x64", "RN50x64-quickgelu")])
def test_openai_names_keep_quickgelu(openai, registry):
    assert get_model_config(openai) == get_model_config(registry) and get_model_config(openai).quick_gelu
    assert get_model_config(pretrained.PRETRAINED[openai].architecture).quick_gelu


def test_gelu_and_quickgelu_give_different_features():
    torch.manual_seed(0)
    gelu = clipforge.create_model("tiny-vit").eval()
    quick = clipforge.create_model("tiny-vit", quick_gelu=True).eval()
    quick.load_state_dict(gelu.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (gelu.encode_image(images) - quick.encode_image(images)).abs().max() > 1e-3


def test_forward_offers_open_clips_contract_and_keeps_openais_default():
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    images, tokens = torch.randn(3, 3, 32, 32), clipforge.tokenize(["a", "b c", "d"], context_length=32)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
        out = model(images, tokens, output_dict=True)
        image_features, text_features, logit_scale = model.features(images, tokens)
        reference_i = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        reference_t = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    torch.testing.assert_close(out["image_features"], reference_i)
    torch.testing.assert_close(text_features, reference_t)
    torch.testing.assert_close(logit_scale, model.logit_scale.exp())
    torch.testing.assert_close(logits_per_image, logit_scale * reference_i @ reference_t.t())
    torch.testing.assert_close(logits_per_text, logits_per_image.t())
    loss = contrastive_loss(*model.features(images, tokens))  # OpenCLIP's training-loop line
    assert loss.requires_grad and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_saved_folder_matches_open_clips_local_dir_schema(tmp_path, name):
    torch.manual_seed(0)
    model = clipforge.create_model(name).eval()
    folder = clipforge.save(model, tmp_path / "ckpt")
    meta = json.loads((folder / "open_clip_config.json").read_text())
    assert set(meta) == {"model_cfg", "preprocess_cfg"}
    cfg = meta["model_cfg"]
    assert set(cfg) <= OPEN_CLIP_MODEL_KEYS and set(cfg["vision_cfg"]) <= OPEN_CLIP_VISION_KEYS
    assert set(cfg["text_cfg"]) <= OPEN_CLIP_TEXT_KEYS and set(meta["preprocess_cfg"]) <= OPEN_CLIP_PREPROCESS_KEYS
    assert meta["preprocess_cfg"]["size"] == model.image_size and cfg["quick_gelu"] is False
    found = [n for n in OPEN_CLIP_LOCAL_DIR_WEIGHTS if (folder / n).is_file()]
    assert found[:1] == ["model.safetensors"]
    # OpenCLIP keeps OpenAI's key layout: the file holds exactly the model's OpenAI-layout tensors
    state_dict = load_file(str(folder / found[0]))
    assert state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())


def test_open_clip_config_is_read_back_and_clipforges_own_config_wins(tmp_path):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    folder = clipforge.save(model, tmp_path / "ckpt")
    meta = json.loads((folder / "open_clip_config.json").read_text())
    meta["model_cfg"]["quick_gelu"] = True  # a mismatch shows which file was read
    (folder / "open_clip_config.json").write_text(json.dumps(meta))
    assert clipforge.load(folder, device="cpu")[0].config == model.config
    hub = tmp_path / "hub"  # an OpenCLIP hub folder: open_clip_config.json + open_clip_model.safetensors
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps(meta))
    save_file(model.state_dict(), str(hub / "open_clip_model.safetensors"))
    assert clipforge.load(hub, device="cpu")[0].config == model.config.replace(quick_gelu=True)


def test_cbow_models_write_no_open_clip_config(tmp_path):
    folder = clipforge.save(clipforge.create_model("tiny-vit-cbow"), tmp_path / "ckpt")
    assert not (folder / "open_clip_config.json").exists()


def test_a_file_without_config_warns_that_its_activation_is_unknown(tmp_path):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit")
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    with pytest.warns(UserWarning, match="activation .GELU or QuickGELU. cannot be known"):
        loaded, _ = clipforge.load(tmp_path / "epoch_1.pt", device="cpu")
    assert loaded.config.quick_gelu  # OpenAI's assumption, stated in the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a given architecture: nothing to warn about
        again = clipforge.create_model("tiny-vit", pretrained=tmp_path / "epoch_1.pt")
    assert again.config.quick_gelu is False


def test_pretrained_tags_are_open_clips_table():
    pairs = clipforge.list_pretrained()
    for pair in [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-32", "datacomp_xl_s13b_b90k"),
                 ("ViT-B-32-quickgelu", "metaclip_400m"), ("ViT-L-14", "laion2b_s32b_b82k"),
                 ("ViT-H-14", "laion2b_s32b_b79k"), ("ViT-B-32", "openai"), ("RN50", "yfcc15m")]:
        assert pair in pairs
    assert all(name in list_models() for name, _ in pairs)
    hub = pretrained.pretrained_weights("ViT-B-32", "laion2b_s34b_b79k")
    assert hub.url == ("https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/"
                       "open_clip_model.safetensors")
    assert hub.alternatives[0].endswith("/open_clip_pytorch_model.bin") and hub.sha256 == ""
    assert hub.architecture == "ViT-B-32"
    release = pretrained.pretrained_weights("ViT-B-32", "laion400m_e31")  # trained with QuickGELU
    assert release.sha256 == "d867053b" and release.architecture == "ViT-B-32-quickgelu"
    assert pretrained.pretrained_weights("ViT-B-32", "openai") is pretrained.PRETRAINED["ViT-B/32"]
    squash = pretrained.pretrained_weights("ViT-H-14", "dfn5b")
    assert squash.preprocess["resize_mode"] == "squash"
