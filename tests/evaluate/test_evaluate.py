"""Evaluation: metrics with known answers, dataset readers, and every evaluator on fake models whose image and
text embeddings are known (a perfect model scores 100%, a shuffled one 0%)."""
import io
import json
import math
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipforge.evaluate import evaluate, get_evaluator
from clipforge.data import expand_shards, read_captions, read_classification
from clipforge.evaluate.linear_probe import (fit_logistic_regression, logistic_objective, sample_k_shot, select_l2,
                                             stratified_split)
from clipforge.evaluate.metrics import (classification_metrics, mean_per_class_recall, retrieval_metrics,
                                        topk_accuracy)
from clipforge.tokenizer import Tokenizer

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 20), "purple": (140, 40, 180), "black": (10, 10, 10)}
COLOURS = list(PALETTE)


class ColourModel(nn.Module):
    """A fake CLIP: an image embeds as a sharp softmax over its distance to each palette colour, a text as the
    one-hot of the colour word it contains, moved by ``permutation`` (identity = a perfect model)."""

    context_length = 77

    def __init__(self, permutation=None):
        super().__init__()
        self.palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32)  # (K, 3)
        self.permutation = torch.tensor(permutation or range(len(COLOURS)))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self._tokenizer = Tokenizer()

    def encode_image(self, images):
        distance = torch.cdist(images.mean(dim=(2, 3)) * 255, self.palette)  # (N, K)
        return (-distance / 20).softmax(dim=-1)

    def encode_text(self, tokens):
        texts = [self._tokenizer.decode(row) for row in tokens]
        index = torch.tensor([next(i for i, c in enumerate(COLOURS) if c in t) for t in texts])
        return F.one_hot(self.permutation[index], len(COLOURS)).float()


def to_tensor(image):
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def save_image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), PALETTE[colour] if isinstance(colour, str) else colour).save(path)
    return path


def image_folder(root, counts: dict[str, int]):
    for colour, n in counts.items():
        (root / colour).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            save_image(root / colour / f"{i}.png", colour)
    return root


DERANGED = [1, 2, 3, 4, 5, 0]  # every colour's text points at another colour


# ---------------------------------------------------------------- metrics

def test_topk_accuracy_and_mean_per_class_recall_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    targets = torch.tensor([0, 1, 1, 0])  # right, right, wrong (2nd best), wrong (3rd best)
    assert topk_accuracy(logits, targets, (1, 2, 5)) == {"top1": 0.5, "top2": 0.75, "top5": 1.0}
    # class 0: 1 of 2 right; class 1: 1 of 2 right; class 2 has no samples and is not averaged
    assert mean_per_class_recall(logits.argmax(-1), targets, 3) == pytest.approx(0.5)
    imbalanced = torch.tensor([0, 0, 0, 1])
    assert mean_per_class_recall(torch.tensor([0, 0, 0, 0]), imbalanced, 2) == pytest.approx(0.5)  # (1 + 0) / 2
    assert classification_metrics(logits, targets)["top5"] == 1.0


def test_random_scores_are_about_chance():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6000, 10, generator=generator)
    targets = torch.randint(0, 10, (6000,), generator=generator)
    metrics = classification_metrics(logits, targets)
    assert metrics["top1"] == pytest.approx(0.1, abs=0.02)
    assert metrics["top5"] == pytest.approx(0.5, abs=0.03)
    assert metrics["mean_per_class_recall"] == pytest.approx(0.1, abs=0.02)


def test_retrieval_recall_counts_any_caption_of_an_image():
    image_of_text = torch.tensor([0, 0, 1, 1, 2])
    similarity = torch.tensor([  # (3 images, 5 texts)
        [0.1, 0.9, 0.8, 0.0, 0.0],  # image 0: its 2nd caption is best
        [0.9, 0.0, 0.1, 0.2, 0.0],  # image 1: best is image 0's caption; its own come 3rd and 2nd
        [0.0, 0.0, 0.0, 0.0, 0.1],  # image 2: its caption is best
    ])
    m = retrieval_metrics(similarity, image_of_text, ks=(1, 2))
    assert m["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert m["image_to_text_recall@2"] == pytest.approx(1.0)
    # texts: 0 -> image 1 best (wrong), 1 -> image 0, 2 -> image 0 (wrong), 3 -> image 1, 4 -> image 2
    assert m["text_to_image_recall@1"] == pytest.approx(3 / 5)
    assert m["text_to_image_recall@2"] == pytest.approx(5 / 5)


# ---------------------------------------------------------------- zero-shot

def test_zeroshot_perfect_model_scores_one_and_shuffled_scores_zero(tmp_path):
    root = image_folder(tmp_path / "val", {c: 3 for c in COLOURS})
    perfect = evaluate(ColourModel(), to_tensor, "zeroshot", data=str(root), templates=["a photo of a {} thing."])
    assert perfect == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
    shuffled = evaluate(ColourModel(DERANGED), to_tensor, "zeroshot", data=str(root))
    assert shuffled["top1"] == 0.0 and shuffled["mean_per_class_recall"] == 0.0


def test_classes_line_up_by_folder_when_a_split_lacks_a_class(tmp_path):
    full = read_classification(image_folder(tmp_path / "full", {c: 1 for c in COLOURS}))
    (tmp_path / "part" / "green").mkdir(parents=True)  # an empty class folder stays a class
    image_folder(tmp_path / "part", {"red": 1, "blue": 2})
    with pytest.warns(UserWarning, match="1 of 3 classes have no images \\(green\\)"):
        part = read_classification(tmp_path / "part")
    assert part.class_keys == ["blue", "green", "red"]
    names = {"red": "red thing", "green": "green thing", "blue": "blue thing", "black": "black thing"}
    (tmp_path / "names.json").write_text(json.dumps(names))
    with pytest.warns(UserWarning, match="2 of 4 classes have no images"):
        mapped = read_classification(tmp_path / "part", str(tmp_path / "names.json"))
    assert mapped.class_keys == list(names) and mapped.classnames == list(names.values())
    assert [mapped.class_keys[t] for t in mapped.targets] == ["blue", "blue", "red"]
    assert set(full.class_keys) >= set(part.class_keys)


def test_classname_files_tab_and_list_formats(tmp_path):
    root = image_folder(tmp_path / "val", {"blue": 1, "red": 1})
    (tmp_path / "tab.txt").write_text("red\ta red thing\nblue\ta blue thing\n")
    assert read_classification(root, str(tmp_path / "tab.txt")).classnames == ["a red thing", "a blue thing"]
    (tmp_path / "list.txt").write_text("bluish\nreddish\n")  # names the sorted folders in order
    assert read_classification(root, str(tmp_path / "list.txt")).classnames == ["bluish", "reddish"]
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="2 class folders/labels but 1 names"):
        read_classification(root, str(tmp_path / "short.txt"))
    (tmp_path / "partial.txt").write_text("red\ta red thing\n")
    with pytest.raises(ValueError, match=r"classes \['blue'\] are not in the class names"):
        read_classification(root, str(tmp_path / "partial.txt"))


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    root = image_folder(tmp_path / "val", {c: 2 for c in COLOURS})
    (root / "red" / "broken.png").write_bytes(b"not an image")
    evaluator = get_evaluator("zeroshot", data=str(root))
    with pytest.warns(UserWarning, match="skipped 1 of 13 images"):
        metrics = evaluator.run(ColourModel(), to_tensor)
    assert metrics["top1"] == 1.0
    assert evaluator.details["num_skipped_images"] == 1 and evaluator.details["num_images"] == 12
    assert "broken.png" in evaluator.details["skipped_images"][0]


def test_bad_datasets_give_clear_errors(tmp_path):
    (tmp_path / "empty" / "red").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        read_classification(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no class folders"):
        read_classification(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_classification(tmp_path / "missing")
    save_image(tmp_path / "x.png", "red")
    (tmp_path / "labels.csv").write_text("filepath,label\nx.png,red\nx.png,\n")
    with pytest.raises(ValueError, match="row 3 has an empty label"):
        read_classification(tmp_path / "labels.csv")
    (tmp_path / "cols.csv").write_text("path_to_image,y\nx.png,red\n")
    with pytest.raises(ValueError, match="no image path column"):
        read_classification(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match="unknown evaluation task"):
        evaluate(ColourModel(), to_tensor, "segmentation", data=str(tmp_path))


def test_csv_and_webdataset_classification(tmp_path):
    rows = ["filepath,label"]
    for i, colour in enumerate(COLOURS):
        save_image(tmp_path / "img" / f"{i}.png", colour)
        rows.append(f"img/{i}.png,{colour}")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    assert evaluate(ColourModel(), to_tensor, "zeroshot", data=str(tmp_path / "val.csv"))["top1"] == 1.0

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, colour in enumerate(COLOURS):
            for name, payload in ((f"s{i}.png", (tmp_path / "img" / f"{i}.png").read_bytes()),
                                  (f"s{i}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "names.txt").write_text("\n".join(COLOURS) + "\n")  # line i names label i
    with pytest.raises(ValueError, match="labels are integers; pass class names"):
        read_classification(tmp_path / "shard-000.tar")
    spec = str(tmp_path / "shard-{000..000}.tar")
    assert expand_shards(spec) == [str(tmp_path / "shard-000.tar")]
    metrics = evaluate(ColourModel(), to_tensor, "zeroshot", data=spec, classnames=str(tmp_path / "names.txt"))
    assert metrics["top1"] == 1.0


# ---------------------------------------------------------------- retrieval

def _caption_set(tmp_path):
    entries = [{"filename": f"{c}.png", "filepath": "imgs", "split": "test",
                "sentences": [{"raw": f"a {c} square"}, {"raw": f"something {c}"}]} for c in COLOURS[:5]]
    entries.append({"filename": "black.png", "filepath": "imgs", "split": "train", "sentences": [{"raw": "black"}]})
    for c in COLOURS:
        save_image(tmp_path / "imgs" / f"{c}.png", c)
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    return tmp_path / "karpathy.json"


def test_retrieval_perfect_and_shuffled(tmp_path):
    path = _caption_set(tmp_path)
    data = read_captions(path, split="test")
    assert len(data.images) == 5 and len(data.captions) == 10 and data.image_of_caption[:4] == [0, 0, 1, 1]
    evaluator = get_evaluator("retrieval", data=str(path))
    assert set(evaluator.run(ColourModel(), to_tensor).values()) == {1.0}
    assert evaluator.details == {"skipped_images": [], "num_skipped_images": 0, "num_images": 5, "num_captions": 10}
    shuffled = evaluate(ColourModel([1, 2, 3, 4, 0, 5]), to_tensor, "retrieval", data=str(path))
    assert shuffled["image_to_text_recall@1"] == 0.0 and shuffled["text_to_image_recall@1"] == 0.0
    assert shuffled["text_to_image_recall@5"] == 1.0  # K capped at the 5 candidate images
    with pytest.raises(ValueError, match=r"no images in split 'val'; splits present: \['test', 'train'\]"):
        read_captions(path, split="val")


def test_retrieval_from_a_caption_csv(tmp_path):
    for c in COLOURS[:3]:
        save_image(tmp_path / f"{c}.png", c)
    rows = [f"{c}.png\t{text} {c}" for c in COLOURS[:3] for text in ("a", "the colour")]
    (tmp_path / "captions.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    data = read_captions(tmp_path / "captions.tsv")
    assert data.image_of_caption == [0, 0, 1, 1, 2, 2]
    metrics = evaluate(ColourModel(), to_tensor, "retrieval", data=str(tmp_path / "captions.tsv"))
    assert metrics["image_to_text_recall@1"] == 1.0 and metrics["text_to_image_recall@1"] == 1.0


# ---------------------------------------------------------------- linear probe

def _problem(n=90, dim=5, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64) + 1.5 * F.one_hot(y, dim).double()
    return x, y


def test_logistic_gradients_match_autograd():
    x, y = _problem()
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss, grad_w, grad_b = logistic_objective(weight.detach(), bias.detach(), x, y, 0.7)
    reference = (F.cross_entropy(x @ weight + bias, y, reduction="sum") + 0.35 * weight.pow(2).sum()) / len(y)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(grad_w, weight.grad)
    torch.testing.assert_close(grad_b, bias.grad)


def test_lbfgs_fit_matches_scipy_optimum():
    optimize = pytest.importorskip("scipy.optimize")
    x, y = _problem()
    probe = fit_logistic_regression(x, y, 3, l2=2.0)

    def objective(flat):
        w = torch.tensor(flat[:15]).reshape(5, 3)
        b = torch.tensor(flat[15:])
        loss, gw, gb = logistic_objective(w, b, x, y, 2.0)
        return loss.item(), torch.cat([gw.flatten(), gb]).numpy()

    result = optimize.minimize(objective, np.zeros(18), jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
    ours = logistic_objective(probe.weight, probe.bias, x, y, 2.0)[0].item()
    assert ours == pytest.approx(result.fun, abs=1e-6)  # stopped at scikit-learn's gradient tolerance
    torch.testing.assert_close(probe.weight.flatten(), torch.tensor(result.x[:15]), atol=2e-3, rtol=0)


def test_l2_sweep_validation_split_and_k_shot_draw():
    x, y = _problem(n=120, seed=1)
    train, val = stratified_split(y, 0.25, seed=0)
    assert len(val) == 30 and set(y[val].tolist()) == {0, 1, 2} and not set(train.tolist()) & set(val.tolist())
    assert torch.equal(stratified_split(y, 0.25, seed=0)[1], val)
    l2, tried = select_l2(x[train], y[train], x[val], y[val], 3)
    assert 1e-6 <= l2 <= 1e6 and len(tried) >= 7
    assert max(acc for _, acc in tried) > 0.5  # informative features: well above chance (1/3)
    shots = sample_k_shot(y, 4, seed=3)
    assert torch.bincount(y[shots]).tolist() == [4, 4, 4]
    assert torch.equal(shots, sample_k_shot(y, 4, seed=3)) and not torch.equal(shots, sample_k_shot(y, 4, seed=4))


def test_linear_probe_evaluator_on_fake_features(tmp_path):
    train = image_folder(tmp_path / "train", {c: 5 for c in COLOURS})
    test = image_folder(tmp_path / "test", {c: 2 for c in COLOURS})
    evaluator = get_evaluator("linear-probe", data=str(test), train_data=str(train))
    assert evaluator.run(ColourModel(), to_tensor)["top1"] == 1.0
    assert (evaluator.details["num_train"], evaluator.details["num_val"], evaluator.details["num_test"]) == (24, 6, 12)
    few = get_evaluator("linear-probe", data=str(test), train_data=str(train), k_shot=1)
    assert few.run(ColourModel(), to_tensor)["top1"] == 1.0
    assert few.details["num_train"] == 6 and few.details["num_val"] == 6


# ---------------------------------------------------------------- robustness

def test_robustness_reports_each_shift_and_its_drop(tmp_path):
    base = image_folder(tmp_path / "base", {c: 2 for c in COLOURS})
    shifted = image_folder(tmp_path / "shifted", {"red": 2, "green": 2})  # lacks four classes
    save_image(shifted / "red" / "orange.png", (235, 160, 25))  # nearer yellow than red
    options = dict(data=str(base), shifted={"orange": str(shifted), "same": str(base)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate(ColourModel(), to_tensor, "robustness", **options)
        restricted = evaluate(ColourModel(), to_tensor, "robustness", restrict_classes=True, **options)
    assert metrics["top1"] == 1.0 and metrics["same/top1"] == 1.0 and metrics["same/drop"] == 0.0
    assert metrics["orange/top1"] == pytest.approx(4 / 5) and metrics["orange/drop"] == pytest.approx(1 / 5)
    assert metrics["mean_shifted_top1"] == pytest.approx(0.9)
    assert restricted["orange/top1"] == 1.0  # yellow is not a candidate when scoring only red and green
    with pytest.raises(ValueError, match="needs at least one shifted set"):
        evaluate(ColourModel(), to_tensor, "robustness", data=str(base))
