"""The model contract: reference parity, parameter counts, CBOW, grad checkpointing, freezing, fp32 LayerNorm."""
import pytest
import torch
from safetensors.torch import load_file

from clipforge.models import CLIP, CLIPConfig, get_model_config
from clipforge.models.layers import LayerNorm

DATA = "tests/fixtures"

PARAM_COUNTS = {
    "RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
    "RN50x64": 623_258_305, "ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513,
    "ViT-L/14@336px": 427_944_193,
}


def _tokens(n: int, length: int, context_length: int, vocab_size: int = 49408) -> torch.Tensor:
    """Token rows shaped like the tokenizer's: start, words, end-of-text (the largest id), padding."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    tokens[:, 0] = vocab_size - 2
    tokens[:, 1:length + 1] = torch.randint(1, vocab_size - 2, (n, length), generator=g)
    tokens[:, length + 1] = vocab_size - 1
    return tokens


@pytest.mark.parametrize("name", ["tiny_rn", "tiny_vit"])
def test_reference_parity(name):
    model = CLIP(CLIPConfig.from_json(f"{DATA}/{name}.json")).eval()
    model.load_state_dict(load_file(f"{DATA}/{name}.safetensors"), strict=True)
    ref = load_file(f"{DATA}/{name}_io.safetensors")
    with torch.no_grad():
        image_features = model.encode_image(ref["images"])
        text_features = model.encode_text(ref["tokens"])
        logits_per_image, logits_per_text = model(ref["images"], ref["tokens"])
    torch.testing.assert_close(image_features, ref["image_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_features, ref["text_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_per_image, ref["logits_per_image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_per_text, ref["logits_per_image"].t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_named_architectures_parameter_counts(name):
    with torch.device("meta"):
        model = CLIP(get_model_config(name))
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_cbow_text_encoder_is_a_bag_of_words():
    torch.manual_seed(0)
    model = CLIP(get_model_config("tiny-vit-cbow")).eval()
    tokens = _tokens(2, 5, model.context_length)
    shuffled = tokens.clone()
    shuffled[:, 1:6] = tokens[:, [5, 3, 1, 4, 2]]  # same words, other order
    with torch.no_grad():
        features = model.encode_text(tokens)
        assert features.shape == (2, 128) and torch.isfinite(features).all()
        torch.testing.assert_close(model.encode_text(shuffled), features)
        assert not torch.allclose(features[0], features[1])
        images = torch.randn(2, 3, 32, 32)
        assert model(images, tokens)[0].shape == (2, 2)


def _loss_and_grads(model: CLIP, images: torch.Tensor, tokens: torch.Tensor):
    model.zero_grad()
    logits, _ = model(images, tokens)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(images)))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_grad_checkpointing_gives_the_same_outputs_and_grads(name):
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_json(f"{DATA}/{name}.json")).eval()  # eval: fixed BatchNorm statistics
    images, tokens = torch.randn(3, 3, 64, 64), _tokens(3, 4, model.context_length, model.vocab_size)
    logits, grads = _loss_and_grads(model, images, tokens)
    model.set_grad_checkpointing(True)
    logits_ckpt, grads_ckpt = _loss_and_grads(model, images, tokens)
    torch.testing.assert_close(logits_ckpt, logits)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name_ in grads:
        torch.testing.assert_close(grads_ckpt[name_], grads[name_], atol=1e-6, rtol=1e-5)


def test_freeze_image_tower_locks_weights_and_batchnorm():
    torch.manual_seed(0)
    model = CLIP(get_model_config("tiny-rn"))
    model.freeze(image=True)
    model.train()
    assert not model.visual.training and model.transformer.training
    bn_mean = model.visual.bn1.running_mean.clone()
    _, grads = _loss_and_grads(model, torch.randn(2, 3, 64, 64), _tokens(2, 3, model.context_length))
    assert all(not p.requires_grad for p in model.visual.parameters())
    assert not any(n.startswith("visual.") for n in grads)
    assert "token_embedding.weight" in grads and "logit_scale" in grads
    torch.testing.assert_close(model.visual.bn1.running_mean, bn_mean)
    model.freeze(text=True)
    assert all(p.requires_grad for p in model.visual.parameters())
    assert not any(p.requires_grad for p in model.text_parameters())


def test_fp32_layernorm_under_bf16_autocast():
    torch.manual_seed(0)
    norm = LayerNorm(16)
    x = (torch.randn(4, 16) * 1e3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.nn.functional.layer_norm(x.float(), (16,)), atol=2e-2, rtol=1e-2)
    model = CLIP(get_model_config("tiny-vit")).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.encode_image(torch.randn(2, 3, 32, 32))
    assert features.dtype == torch.bfloat16 and torch.isfinite(features).all()


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-vit-cbow"])
def test_text_padding_after_end_of_text_is_not_computed(name, monkeypatch):
    """Trimming the batch to its longest caption gives the features and gradients of the full context."""
    import clipforge.models.text as text_module

    torch.manual_seed(0)
    model = CLIP(get_model_config(name)).eval()
    tokens = torch.cat([_tokens(2, 3, model.context_length), _tokens(1, 6, model.context_length)])
    images = torch.randn(3, 3, 32, 32)
    seen = []
    model.token_embedding.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    trimmed_logits, trimmed_grads = _loss_and_grads(model, images, tokens)
    assert seen == [8]  # start, six words, end-of-text: the longest row, not the 32-token context
    with torch.no_grad():  # an empty batch has nothing to trim
        assert model.encode_text(tokens[:0]).shape == (0, model.config.embed_dim)
    monkeypatch.setattr(text_module, "_may_trim", lambda: False)
    logits, grads = _loss_and_grads(model, images, tokens)
    assert seen[-1] == model.context_length
    torch.testing.assert_close(trimmed_logits, logits, atol=1e-5, rtol=1e-5)
    assert trimmed_grads.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(trimmed_grads[key], grads[key], atol=1e-5, rtol=1e-4)


def test_resnet_runs_channels_last_with_the_values_of_the_plain_layout():
    import copy
    torch.manual_seed(0)
    model = CLIP(get_model_config("tiny-rn")).eval()
    assert model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert plain.visual.conv1.weight.is_contiguous()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), plain.encode_image(images), atol=1e-6, rtol=1e-6)
    state = model.state_dict()
    assert state["visual.conv1.weight"].shape == plain.state_dict()["visual.conv1.weight"].shape


def test_quick_gelu_mlp_equals_linear_quick_gelu_linear():
    """The fused form (SiLU with the 1.702 scalings inside the matrix multiplies) is QuickGELU's MLP."""
    from clipforge.models.layers import MLP, QuickGELU
    torch.manual_seed(0)
    mlp = MLP(16, 64, QuickGELU)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def reference(x):
        h = mlp.c_fc(x)
        return mlp.c_proj(h * torch.sigmoid(1.702 * h))
    expected = reference(x)
    expected.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    out = mlp(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    for got, want in zip([x.grad] + [p.grad for p in mlp.parameters()], grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the in-place inference path
        torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)


def _onednn():
    from clipforge.models.layers import pack_linear_weights
    if not pack_linear_weights(torch.nn.Module()):
        pytest.skip("this torch has no oneDNN")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-vit", "ViT-B-32"])  # QuickGELU and exact GELU MLPs
def test_packed_text_weights_give_the_plain_features(name):
    """oneDNN-packed products (activation fused) equal the plain ones up to float32 rounding, for queries of
    several lengths in one batch."""
    from clipforge.models.layers import pack_linear_weights
    from clipforge.tokenizer import model_tokenizer
    _onednn()
    torch.manual_seed(0)
    model = CLIP(get_model_config(name)).eval()
    tokens = model_tokenizer(model)(["a dog", "a photo of a cat sitting on a red mat at night", "x"])
    with torch.no_grad():
        plain = model.encode_text(tokens)
        assert pack_linear_weights(model.transformer)
        packed = model.encode_text(tokens)
    assert not torch.equal(packed, plain)  # another kernel ran
    torch.testing.assert_close(packed, plain, atol=2e-5, rtol=1e-5)


def test_packed_weights_give_way_to_gradients_changed_weights_and_copies():
    import copy
    from clipforge.models.layers import MLP, Attention, QuickGELU, pack_linear_weights
    _onednn()
    torch.manual_seed(0)
    block = torch.nn.Sequential(Attention(16, 2), MLP(16, 64, QuickGELU))
    x = torch.randn(2, 5, 16)
    pack_linear_weights(block)
    mlp = block[1]
    with torch.no_grad():
        before = mlp(x)
        mlp.c_fc.weight.mul_(2)  # modified in place (an optimiser step, a load_state_dict)
        after = mlp(x)
    mlp._packed.clear()
    with torch.no_grad():
        torch.testing.assert_close(after, mlp(x), atol=0, rtol=0)  # the modified weights, not the stale copy
    assert not torch.allclose(before, after)
    pack_linear_weights(block)
    out = block(x.requires_grad_())  # gradients: the plain products, so gradients reach the weights
    out.sum().backward()
    assert mlp.c_fc.weight.grad is not None and block[0].in_proj_weight.grad is not None
    clone = copy.deepcopy(block)  # a copy carries no packed weights (they would name the original's)
    assert all(v is None for v in clone[0]._packed.values())
    with torch.no_grad():
        torch.testing.assert_close(clone(x), block(x), atol=2e-5, rtol=1e-5)
