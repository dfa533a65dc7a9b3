"""Zero-shot classifier: prompt-ensembling arithmetic, batching and refresh, templates, scores and bad input."""
import math

import pytest
import torch
from torch import nn

from clipforge.models import CLIP, get_model_config
from clipforge.tokenizer import Tokenizer, tokenize
from clipforge.data import load_classnames
from clipforge.zeroshot import (ZeroShotClassifier, build_zeroshot_classifier, check_classnames, fill_template,
                                load_templates, template_set_names)


class PromptTableModel(nn.Module):
    """encode_text returns a fixed vector per prompt (looked up by the decoded tokens); encode_image is identity."""

    context_length = 77

    def __init__(self, table: dict[str, list[float]], scale: float = 10.0):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.table, self.calls, self.texts_seen = table, 0, 0
        self._tokenizer = Tokenizer()

    def encode_text(self, tokens):
        self.calls += 1
        self.texts_seen += len(tokens)
        return torch.stack([torch.tensor(self.table[self._tokenizer.decode(row)]) for row in tokens]) * self.gain

    def encode_image(self, images):
        return images


TABLE = {
    "a photo of a cat": [3.0, 4.0, 0.0], "art of cat": [0.0, 0.0, 2.0],
    "a photo of a dog": [1.0, 0.0, 0.0], "art of dog": [1.0, 1.0, 0.0],
    "a photo of a thing": [0.0, 0.0, 1.0], "art of thing": [0.0, 0.0, 1.0],
}
TEMPLATES = ["a photo of a {}", "art of {c}"]


def test_prompt_ensembling_matches_hand_computation():
    weights = build_zeroshot_classifier(PromptTableModel(TABLE), ["cat", "dog"], TEMPLATES)
    # cat: normalize([3,4,0]) = [.6,.8,0], normalize([0,0,2]) = [0,0,1]; mean [.3,.4,.5], norm sqrt(.5)
    cat = torch.tensor([0.3, 0.4, 0.5]) / math.sqrt(0.5)
    # dog: [1,0,0] and [1,1,0]/sqrt(2); mean [(1+r)/2, r/2, 0] with r = 1/sqrt(2), then renormalised
    r = 1 / math.sqrt(2)
    dog = torch.tensor([(1 + r) / 2, r / 2, 0.0])
    dog = dog / dog.norm()
    assert weights.shape == (3, 2)  # (embed_dim, num_classes)
    torch.testing.assert_close(weights[:, 0], cat)
    torch.testing.assert_close(weights[:, 1], dog)


def test_classifier_is_batched_and_kept_until_refreshed():
    model = PromptTableModel(TABLE)
    first = build_zeroshot_classifier(model, ["cat", "dog"], TEMPLATES, batch_size=3)
    assert (model.calls, model.texts_seen) == (2, 4)  # 4 prompts in batches of 3
    classifier = ZeroShotClassifier(model, ["cat", "dog"], TEMPLATES, batch_size=3)
    assert (model.calls, model.texts_seen) == (5, 10)  # the 4 class prompts, then the 2 neutral ones
    built = classifier.weights
    classifier.multilabel_scores(torch.ones(2, 3))
    assert classifier.weights is built and model.calls == 5  # computed once, when built
    with torch.no_grad():
        model.gain.mul_(2.0)  # an in-place update, as an optimizer step makes
    classifier.refresh()
    assert model.calls == 8 and classifier.weights is not built
    torch.testing.assert_close(classifier.weights, first)  # a uniform gain does not change normalised embeddings


def test_probabilities_and_multilabel_scores_by_hand():
    classifier = ZeroShotClassifier(PromptTableModel(TABLE, scale=10.0), ["cat", "dog"], TEMPLATES)
    image = torch.tensor([[0.0, 3.0, 4.0]])
    cos = (image / 5.0) @ classifier.weights  # (1, 2)
    probs = classifier.probabilities(image)
    torch.testing.assert_close(probs, (10.0 * cos).softmax(dim=-1))
    assert probs.sum().item() == pytest.approx(1.0)
    neutral = torch.tensor([0.0, 0.0, 1.0])  # "thing" through both templates
    expected = torch.sigmoid(10.0 * (cos - (image / 5.0) @ neutral))
    torch.testing.assert_close(classifier.multilabel_scores(image), expected)
    alone = ZeroShotClassifier(classifier.model, ["cat"], TEMPLATES).multilabel_scores(image)
    assert alone[0, 0].item() == pytest.approx(expected[0, 0].item())  # a label's score ignores the others


def test_predict_orders_labels_and_caps_top_k():
    classifier = ZeroShotClassifier(PromptTableModel(TABLE), ["cat", "dog"], TEMPLATES)
    (preds,) = classifier.predict(torch.tensor([[1.0, 0.1, 0.0]]), top_k=10)
    assert [label for label, _ in preds] == ["dog", "cat"]
    assert preds[0][1] > preds[1][1] and sum(p for _, p in preds) == pytest.approx(1.0)


def test_single_template_logits_equal_the_model_forward():
    torch.manual_seed(0)
    model = CLIP(get_model_config("tiny-vit")).eval()
    images = torch.randn(3, 3, 32, 32)
    classes = ["red circle", "blue square", "green star"]
    classifier = ZeroShotClassifier(model, classes, ["a photo of a {}."])
    logits_per_image, _ = model(images, tokenize([f"a photo of a {c}." for c in classes], context_length=32))
    features = classifier.encode_images(images)
    torch.testing.assert_close(classifier.logits(features), logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(classifier.weights.norm(dim=0), torch.ones(3))


def test_template_sets_files_and_literals(tmp_path):
    assert load_templates() == ["a photo of a {}."]
    assert len(load_templates("openai")) == 80 and load_templates("openai") == load_templates("imagenet1k")
    assert len(load_templates("cifar10")) == 18
    assert {"openai", "imagenet1k", "food101", "pets", "cifar100"} <= set(template_set_names())
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\n  itap of a {c}.  \n")
    assert load_templates(str(path)) == ["a photo of a {}.", "itap of a {c}."]
    assert load_templates("a sketch of a {}.") == ["a sketch of a {}."]
    assert fill_template("a {c} next to a {}", "cat") == "a cat next to a cat"
    assert len(load_classnames("imagenet1k")) == 1000


def test_bad_templates_and_labels_are_clear_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\na photo without a slot\n")
    with pytest.raises(ValueError, match=r"template 2 'a photo without a slot' has no class placeholder"):
        load_templates(str(path))
    with pytest.raises(ValueError, match="not a template set"):
        load_templates("no-such-set")
    with pytest.raises(ValueError, match="no templates"):
        load_templates([])
    with pytest.raises(ValueError, match="class 2 is an empty string"):
        check_classnames(["cat", " ", "dog"])
    with pytest.raises(ValueError, match="'cat' appears twice"):
        ZeroShotClassifier(PromptTableModel(TABLE), ["cat", "dog", "cat"], TEMPLATES)
    with pytest.raises(ValueError, match="no class names"):
        build_zeroshot_classifier(PromptTableModel(TABLE), [], TEMPLATES)
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_classnames(str(classes))
