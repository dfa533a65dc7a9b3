"""Tests for the paper's objective baselines (sec. 2.3-2.5): bag-of-words and caption losses against their
definitions, the zero-shot scorer of each objective on hand-made cases, save/load round trips, the MLP
projection and the fixed temperature, and `clipforge eval` scoring such models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.cli import main
from clipforge.data.shapes import write_classification
from clipforge.evaluate.robustness import RobustnessEvaluator
from clipforge.evaluate.zeroshot import ZeroShotEvaluator
from clipforge.loss import bow_loss, caption_log_likelihood, caption_loss
from clipforge.models import CLIP, CLIPConfig, get_model_config
from clipforge.tokenizer import get_tokenizer
from clipforge.transforms import image_transform
from clipforge.zeroshot import ZeroShotClassifier, build_zeroshot_classifier, zeroshot_scores

TEMPLATES = ["a photo of a {}.", "a {} drawn"]
CLASSES = ["red circle", "blue square", "green triangle"]


def _model(objective: str = "contrastive", base: str = "tiny-vit", **overrides) -> CLIP:
    torch.manual_seed(0)
    if objective == "classify":
        overrides.setdefault("classnames", CLASSES)
    return CLIP(get_model_config(base).replace(objective=objective, **overrides)).eval()


def _images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _outputs(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.objective == "bow":
            return model.bow_logits(images)
        if model.objective == "caption":
            return model.caption_logits(images, tokens)
        if model.objective == "classify":
            return model.class_logits(images)
        return torch.cat(model(images, tokens))


# ---- losses against their definitions


def _bow_reference(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Row by row: the distinct tokens strictly between start-of-text and end-of-text, each weighted 1/k."""
    losses = []
    for row, ids in zip(logits, tokens.tolist()):
        eot = ids.index(max(ids))
        words = set(ids[1:eot])
        if words:
            log_probs = torch.log_softmax(row, dim=0)
            losses.append(-sum(log_probs[w] for w in words) / len(words))
    return sum(losses) / len(losses)


def _caption_reference(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token by token: -log p(token t+1 | position t) for t + 1 = 1..end-of-text, averaged over all of them."""
    total, count = 0.0, 0
    for row, ids in zip(logits, tokens.tolist()):
        eot = ids.index(max(ids))
        for t in range(eot):
            total = total - torch.log_softmax(row[t], dim=0)[ids[t + 1]]
            count += 1
    return total / count


# Vocabulary of 8: start-of-text 6, end-of-text 7 (the largest id of each row), padding 0.
TOKENS = torch.tensor([[6, 1, 2, 2, 7, 0, 0], [6, 3, 7, 0, 0, 0, 0], [6, 0, 4, 5, 1, 7, 0]])


def test_bow_loss_hand_made_values():
    uniform = torch.zeros(1, 8)
    assert bow_loss(uniform, TOKENS[:1]).item() == pytest.approx(math.log(8))
    logits = torch.tensor([[0.0, 1.0, 2.0, 0, 0, 0, 0, 0]])
    lse = torch.logsumexp(logits[0], 0).item()
    # words {1, 2} (2 repeated counts once): -(0.5 * (1 - lse) + 0.5 * (2 - lse))
    assert bow_loss(logits, TOKENS[:1]).item() == pytest.approx(lse - 1.5)
    # token id 0 inside a caption is a word; the padding zeros after end-of-text are not
    assert bow_loss(logits, TOKENS[2:]).item() == pytest.approx(lse - (0 + 0 + 0 + 1) / 4)


def test_bow_loss_matches_definition_values_and_gradients():
    logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(bow_loss(logits, TOKENS), _bow_reference(logits, TOKENS))
    grad, = torch.autograd.grad(bow_loss(logits, TOKENS), logits)
    expected, = torch.autograd.grad(_bow_reference(logits, TOKENS), logits)
    torch.testing.assert_close(grad, expected)
    assert torch.autograd.gradcheck(lambda x: bow_loss(x, TOKENS), (logits,))


def test_bow_loss_leaves_out_captions_without_words():
    logits = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[6, 7, 0, 0], [6, 3, 1, 7]])
    torch.testing.assert_close(bow_loss(logits, tokens), bow_loss(logits[1:], tokens[1:]))
    empty = bow_loss(logits[:1], tokens[:1])
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_caption_loss_hand_made_value_and_definition():
    assert caption_loss(torch.zeros(3, 7, 8), TOKENS).item() == pytest.approx(math.log(8))
    logits = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(caption_loss(logits, TOKENS), _caption_reference(logits, TOKENS))
    grad, = torch.autograd.grad(caption_loss(logits, TOKENS), logits)
    expected, = torch.autograd.grad(_caption_reference(logits, TOKENS), logits)
    torch.testing.assert_close(grad, expected)
    assert grad[:, -1].abs().sum() == 0 and grad[1, 2:].abs().sum() == 0  # nothing predicted after end-of-text
    assert torch.autograd.gradcheck(lambda x: caption_loss(x, TOKENS), (logits,))


def test_caption_log_likelihood_counts_tokens_up_to_end_of_text():
    logits = torch.zeros(3, 7, 8)
    counts = torch.tensor([4.0, 2.0, 5.0])  # tokens 1..end-of-text of each row
    torch.testing.assert_close(caption_log_likelihood(logits, TOKENS), -counts * math.log(8))


@pytest.mark.parametrize("call", [lambda: bow_loss(torch.zeros(2, 8), TOKENS),
                                  lambda: caption_loss(torch.zeros(3, 6, 8), TOKENS),
                                  lambda: caption_loss(torch.zeros(3, 7, 8), TOKENS.float())])
def test_losses_reject_mismatched_inputs(call):
    with pytest.raises(ValueError, match="logits|tokens"):
        call()


# ---- zero-shot scorers on hand-made cases


def test_bow_scorer_ranks_the_class_whose_words_the_head_favours():
    model = _model("bow")
    tokenizer = get_tokenizer(model.context_length)
    with torch.no_grad():
        model.bow_head.weight.zero_()
        model.bow_head.bias.zero_()
        for word in ("blue", "square"):
            model.bow_head.bias[tokenizer.encode(word)] = 5.0
    scores = ZeroShotClassifier(model, CLASSES, TEMPLATES).scores(_images(4))
    assert (scores.argmax(dim=1) == CLASSES.index("blue square")).all()


def test_bow_scorer_equals_summed_word_log_probabilities():
    model = _model("bow")
    images = _images(3)
    tokenizer = get_tokenizer(model.context_length)
    with torch.no_grad():
        log_probs = torch.log_softmax(model.bow_logits(images), dim=-1)  # (N, V)
    expected = torch.tensor([[sum(sum(log_probs[n, tokenizer.encode(t.format(c))]).item() for t in TEMPLATES)
                              / len(TEMPLATES) for c in CLASSES] for n in range(len(images))])
    torch.testing.assert_close(zeroshot_scores(model, images, CLASSES, TEMPLATES), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("base", ["tiny-vit", "tiny-rn"])
def test_caption_scorer_equals_token_by_token_log_likelihood(base, one_thread):
    model = _model("caption", base)
    images = _images(2, model.image_size)
    tokenizer = get_tokenizer(model.context_length)
    expected = torch.zeros(len(images), len(CLASSES))
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            for template in TEMPLATES:
                ids = [tokenizer.sot_token_id, *tokenizer.encode(template.format(name)), tokenizer.eot_token_id]
                logits = model.caption_logits(images, torch.tensor([ids] * len(images)))  # no padding, one prompt
                for t in range(1, len(ids)):  # position t - 1 predicts token t
                    expected[:, c] += torch.log_softmax(logits[:, t - 1], dim=-1)[:, ids[t]] / len(TEMPLATES)
    classifier = ZeroShotClassifier(model, CLASSES, TEMPLATES, batch_size=1)
    torch.testing.assert_close(classifier.scores(images), expected, rtol=1e-5, atol=1e-4)


def test_prompt_log_likelihoods_equal_the_loss_definition_for_every_pair(one_thread):
    model = _model("caption")
    texts = ["a red circle above a blue square", "a red circle", "a cat", "", "a red square"]  # shared prefixes
    tokens = clipforge.tokenize(texts, context_length=32)[:, :10]
    with torch.no_grad():
        memory = model.decoder.memory(model.image_tokens(_images(3)))
        expected = torch.stack([caption_log_likelihood(model.decoder.decode(m.expand(len(tokens), -1, -1), tokens),
                                                       tokens) for m in memory])  # (3 images, 5 prompts)
        torch.testing.assert_close(model.decoder.prompt_log_likelihoods(memory, tokens), expected,
                                   rtol=1e-5, atol=1e-4)


def test_caption_decoder_is_causal(one_thread):
    model = _model("caption")
    tokens = clipforge.tokenize(["a red circle above a blue square"], context_length=32)[:, :9]
    with torch.no_grad():
        full = model.caption_logits(_images(1), tokens)
        for t in (1, 4, 8):  # a prefix alone gives the same predictions: no later token leaks in
            torch.testing.assert_close(model.caption_logits(_images(1), tokens[:, :t]), full[:, :t],
                                       rtol=1e-5, atol=1e-5)


def test_caption_scorer_chunks_pairs_without_changing_scores(monkeypatch, one_thread):
    model = _model("caption")
    images = _images(2)
    whole = zeroshot_scores(model, images, CLASSES, TEMPLATES)
    monkeypatch.setattr("clipforge.objectives._CAPTION_LOGITS_BUDGET", 1)  # one image at a time
    torch.testing.assert_close(zeroshot_scores(model, images, CLASSES, TEMPLATES, batch_size=2), whole)


def test_classify_scores_are_the_heads_columns_in_requested_order():
    model = _model("classify")
    images = _images(3)
    with torch.no_grad():
        logits = model.class_logits(images)
    order = ["green triangle", "red circle"]
    torch.testing.assert_close(ZeroShotClassifier(model, order, TEMPLATES).scores(images), logits[:, [2, 0]])
    predicted = ZeroShotClassifier(model, CLASSES).predict(images, top_k=1)
    assert [p[0][0] for p in predicted] == [CLASSES[i] for i in logits.argmax(1)]
    with pytest.raises(ValueError, match="'purple star'.*not among the 3 classes"):
        ZeroShotClassifier(model, ["red circle", "purple star"])


def test_contrastive_scores_are_the_cosine_logits():
    model = _model()
    images = _images(3)
    classifier = ZeroShotClassifier(model, CLASSES, TEMPLATES)
    features = F.normalize(model.encode_image(images), dim=-1)
    expected = model.logit_scale.exp() * features @ build_zeroshot_classifier(model, CLASSES, TEMPLATES)
    torch.testing.assert_close(classifier.scores(images), expected.detach(), rtol=1e-5, atol=1e-5)
    probabilities = [p[0][1] for p in classifier.predict(images, top_k=1)]
    torch.testing.assert_close(torch.tensor(probabilities), expected.softmax(-1).max(-1).values.detach())


def test_models_without_text_encoder_say_how_to_classify(tmp_path):
    model = _model("bow")
    with pytest.raises(ValueError, match="objective='bow'.*clipforge.save"):
        clipforge.export_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="'bow' model: it has no text encoder.*ZeroShotClassifier"):
        model.encode_text(clipforge.tokenize(["a cat"], context_length=32))
    with pytest.raises(ValueError, match="class_head needs a 'classify' model; this one is a 'bow'"):
        model.class_logits(_images(1))
    with pytest.raises(ValueError, match="multi-label"):
        ZeroShotClassifier(model, CLASSES).predict(_images(1), multi_label=True)


# ---- configs, round trips, projection and temperature


def test_default_configs_serialise_as_before():
    for name in ("tiny-vit", "tiny-rn", "ViT-B-32"):
        d = get_model_config(name).to_dict()
        assert set(d) == {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
    d = get_model_config("tiny-vit").replace(objective="classify", classnames=["a", "b"]).to_dict()
    assert d["objective"] == "classify" and d["classnames"] == ["a", "b"]
    assert CLIPConfig.from_dict(json.loads(json.dumps(d))) == get_model_config("tiny-vit").replace(
        objective="classify", classnames=("a", "b"))


@pytest.mark.parametrize("overrides,message", [
    (dict(objective="captions"), "objective must be one of contrastive, bow, caption, classify"),
    (dict(projection="deep"), "projection must be 'linear' or 'mlp'"),
    (dict(objective="classify"), "needs classnames"),
    (dict(objective="bow", classnames=["a"]), "only it takes them"),
    (dict(objective="classify", classnames=["a", "a"]), "distinct"),
    (dict(objective="bow", timm_model_name="resnet18"), "clipforge's own towers only"),
    (dict(objective="caption", hf_model_name="bert-base-uncased"), "clipforge's own towers only"),
])
def test_bad_objective_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_model_config("tiny-vit").replace(**overrides)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**get_model_config("tiny-vit").to_dict(), "objective": "lm"}))
    with pytest.raises(ValueError, match=f"{path}: objective must be one of"):
        CLIPConfig.from_json(path)


@pytest.mark.parametrize("objective,base,overrides", [
    ("bow", "tiny-vit", {}), ("caption", "tiny-vit", {}), ("caption", "tiny-rn", {}), ("classify", "tiny-rn", {}),
    ("contrastive", "tiny-vit", dict(projection="mlp")),
    ("bow", "tiny-vit", dict(projection="mlp", learn_logit_scale=False)),
    ("contrastive", "tiny-vit", dict(learn_logit_scale=False, init_logit_scale=math.log(1 / 0.5))),
])
def test_save_load_round_trip_gives_identical_outputs(objective, base, overrides, tmp_path, one_thread):
    model = _model(objective, base, **overrides)
    images = _images(2, model.image_size)
    tokens = clipforge.tokenize(["a red circle", "a blue square on the left"], context_length=32)
    clipforge.save(model, tmp_path / "m")
    loaded, _ = clipforge.load(tmp_path / "m", device="cpu")
    assert loaded.config == model.config and loaded.objective == objective
    torch.testing.assert_close(_outputs(loaded, images, tokens), _outputs(model, images, tokens), rtol=0, atol=0)
    assert loaded.logit_scale.requires_grad == model.config.learn_logit_scale
    openclip_file = (tmp_path / "m" / "open_clip_config.json").exists()
    assert openclip_file == (objective == "contrastive" and model.config.projection == "linear")
    rebuilt = clipforge.create_model(tmp_path / "m" / "config.json", pretrained=tmp_path / "m")
    torch.testing.assert_close(_outputs(rebuilt.eval(), images, tokens), _outputs(model, images, tokens))


def test_mlp_projection_is_relu_then_linear_in_both_towers(one_thread):
    model = _model(projection="mlp")
    images = _images(2)
    tokens = clipforge.tokenize(["a red circle", "a cat"], context_length=32)
    linear = CLIP(model.config.replace(projection="linear"))
    linear.load_state_dict({k: v for k, v in model.state_dict().items() if "_mlp." not in k})
    with torch.no_grad():
        for head, plain, encoded in ((model.image_mlp, linear.encode_image(images), model.encode_image(images)),
                                     (model.text_mlp, linear.encode_text(tokens), model.encode_text(tokens))):
            torch.testing.assert_close(encoded, plain.clamp(min=0) @ head.fc.weight.t() + head.fc.bias)
    loss = clipforge.contrastive_loss(*model.features(images, tokens))
    loss.backward()
    assert model.image_mlp.fc.weight.grad.abs().sum() > 0 and model.text_mlp.fc.weight.grad.abs().sum() > 0
    assert any(p is model.text_mlp.fc.weight for p in model.text_parameters())
    assert not any(p is model.image_mlp.fc.weight for p in model.text_parameters())
    model.freeze(image=True)
    assert not model.image_mlp.fc.weight.requires_grad and model.text_mlp.fc.weight.requires_grad


def test_fixed_temperature_gets_no_gradient_and_keeps_its_value():
    model = _model(learn_logit_scale=False, init_logit_scale=math.log(1 / 0.07)).train()
    assert not model.logit_scale.requires_grad
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = clipforge.tokenize(["a red circle", "a cat"], context_length=32)
    clipforge.contrastive_loss(*model.features(_images(2), tokens)).backward()
    optimizer.step()
    assert model.logit_scale.grad is None
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    for kwargs in (dict(image=True), dict(text=True), {}):
        model.freeze(**kwargs)
        assert not model.logit_scale.requires_grad


# ---- evaluation commands score non-contrastive models


@pytest.fixture(scope="module")
def colour_set(tmp_path_factory):
    return write_classification(tmp_path_factory.mktemp("colours"), split="all", num_samples=16, by="colour",
                                image_size=32)


def _expected_top1(model: CLIP, folder: str, classnames=None) -> float:
    from clipforge.data.classification import read_classification
    from clipforge.data.images import load_image
    data = read_classification(folder, classnames)
    preprocess = image_transform(model.image_size)
    images = torch.stack([preprocess(load_image(ref)) for ref in data.images])
    scores = zeroshot_scores(model, images, data.classnames, ["a photo of a {}."])
    return (scores.argmax(1) == torch.tensor(data.targets)).float().mean().item()


@pytest.mark.parametrize("objective", ["bow", "caption"])
def test_zeroshot_and_robustness_evaluators_score_predictive_models(objective, colour_set, one_thread):
    model = _model(objective)
    preprocess = image_transform(model.image_size)
    metrics = ZeroShotEvaluator(data=colour_set).run(model, preprocess)
    assert metrics["top1"] == pytest.approx(_expected_top1(model, colour_set))
    if objective == "bow":  # the robustness evaluator's class columns, with the cheaper scorer
        robust = RobustnessEvaluator(data=colour_set, shifted={"same": colour_set}, restrict_classes=True)
        assert robust.run(model, preprocess) == pytest.approx(
            {"top1": metrics["top1"], "same/top1": metrics["top1"], "same/drop": 0.0,
             "mean_shifted_top1": metrics["top1"]})


def test_cli_eval_zeroshot_scores_a_saved_classify_model(colour_set, tmp_path, capsys):
    from clipforge.data.classification import read_classification
    names = read_classification(colour_set).classnames
    model = _model("classify", classnames=list(reversed(names)))  # head columns in another order than the set's
    clipforge.save(model, tmp_path / "m")
    output = tmp_path / "results.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "zeroshot", "--data", colour_set,
                 "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["metrics"]["top1"] == pytest.approx(_expected_top1(model, colour_set))
    assert result["details"]["num_images"] == 16


def test_caption_logits_at_predicted_positions_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = CLIP(get_model_config("study-vit").replace(objective="caption")).double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    tokens = torch.zeros(3, 20, dtype=torch.long)
    tokens[:, 0] = 49406
    for row, length in enumerate((3, 7, 1)):
        tokens[row, 1:length + 1] = torch.randint(1, 40000, (length,))
        tokens[row, length + 1] = 49407
    weight = model.decoder.token_embedding.weight
    full = caption_loss(model.caption_logits(images, tokens), tokens)
    sparse_logits = model.caption_logits(images, tokens, predicted_only=True)
    assert sparse_logits.shape == (3 + 7 + 1 + 3, 49408)  # each caption's words and its end-of-text
    sparse = caption_loss(sparse_logits, tokens)
    torch.testing.assert_close(sparse, full, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(sparse, weight)[0], torch.autograd.grad(full, weight)[0],
                               atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="predicted tokens"):
        caption_loss(sparse_logits[1:], tokens)
