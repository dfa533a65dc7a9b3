"""Hostile and careless inputs to inference, evaluation and data loading (issue 11): images whose resized
size or declared size is too large get one limit and one message in every path, argument and text-file
errors name what is wrong, and nothing surfaces as a traceback."""
import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.cli import main
from clipforge.data import DEFAULT_MAX_PIXELS, BadSample, ImageFiles, build_train_data, collate_images
from clipforge.data.classnames import check_classnames, load_classnames
from clipforge.io.factory import load
from clipforge.runtime.device import resolve_device
from clipforge.transforms import EvalTransform, TrainTransform
from clipforge.zeroshot import load_templates

HOSTILE = Path(__file__).parents[1] / "fixtures" / "hostile"
STRIPS = ("strip_1x10000.png", "strip_10000x1.png")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def good_image(tmp_path) -> str:
    path = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return str(path)


# ------------------------------------------------------------------ resized size: bounded in every path

@pytest.mark.parametrize("name", STRIPS)
def test_eval_transform_refuses_a_strip_whose_resized_size_is_too_large(name):
    with pytest.raises(BadSample, match=r"224x2240000|2240000x224") as caught:
        EvalTransform(224)(HOSTILE / name)
    assert caught.value.reason == "too_many_pixels" and f"max_pixels={DEFAULT_MAX_PIXELS}" in str(caught.value)


def test_the_limit_is_the_resized_pixel_count():
    transform = EvalTransform(224)
    # 1 x 1783 resizes to 224 x 399392 = 89,463,808 pixels (under the limit); 1 x 1784 to 89,513,984 (over)
    assert transform.resized_size(1, 1783) == (224, 399392)
    with pytest.raises(BadSample, match="89513984"):
        transform.resized_size(1, 1784)
    # the other resize modes never exceed it, nor does training's crop-then-resize
    assert EvalTransform(224, resize_mode="longest").resized_size(1, 10 ** 6) == (1, 224)
    assert EvalTransform(224, resize_mode="squash").resized_size(1, 10 ** 6) == (224, 224)
    assert TrainTransform(224)(HOSTILE / STRIPS[0]).shape == (3, 224, 224)


def test_classify_skips_a_strip_and_a_header_bomb_with_one_message(saved_tiny_model, good_image, capsys):
    images = [str(HOSTILE / "strip_1x100000.png"), str(HOSTILE / "header_bomb_20000x5000.png"), good_image]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        assert main(["classify", *images, "--model", str(saved_tiny_model), "--labels", "red,blue"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("more than max_pixels=89478485" in line for line in err)
    assert "strip_1x100000.png" in err[0] and "a 1x100000 image resized to a shorter side of" in err[0]
    assert "header_bomb_20000x5000.png is 20000x5000 = 100000000 pixels" in err[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["explain", *images, "--model", str(saved_tiny_model), "--texts", "red", "blue"]) == 0
    assert [line.replace("explain", "classify") for line in capsys.readouterr().err.splitlines()] == err


def test_image_files_used_by_eval_and_index_skip_a_strip(good_image):
    refs = [good_image, str(HOSTILE / "strip_1x100000.png"), str(HOSTILE / "header_bomb_20000x5000.png")]
    indices, batch, errors = collate_images([ImageFiles(refs, EvalTransform(32))[i] for i in range(3)])
    assert indices.tolist() == [0] and batch.shape == (1, 3, 32, 32)
    assert "strip_1x100000.png" in errors[0] and "32x3200000" in errors[0] and "max_pixels" in errors[1]


def test_the_search_index_reader_skips_a_strip(good_image):
    from clipforge.data import DescribedImages, collate_described
    from clipforge.search.model import load_model

    _, preprocess = load_model("tiny-vit", "cpu", random_init=True)
    refs = [good_image, str(HOSTILE / "strip_1x100000.png")]
    indices, batch, _, errors = collate_described([DescribedImages(refs, preprocess)[i] for i in range(2)])
    assert list(indices) == [0] and batch.shape[0] == 1
    assert len(errors) == 1 and "max_pixels" in str(errors[0])


def test_zeroshot_eval_skips_a_strip(saved_tiny_model, good_image, tmp_path, capsys):
    data = tmp_path / "val"
    for label in ("red", "blue"):
        (data / label).mkdir(parents=True)
        shutil.copy(good_image, data / label / "good.png")
    shutil.copy(HOSTILE / "strip_1x100000.png", data / "red" / "strip.png")
    out = tmp_path / "result.json"
    assert main(["eval", "--model", str(saved_tiny_model), "--task", "zeroshot", "--data", str(data),
                 "--output", str(out)]) == 0
    details = json.loads(out.read_text())["details"]
    assert details["num_skipped_images"] == 1 and "max_pixels" in details["skipped_images"][0]
    assert "strip.png" in details["skipped_images"][0]


def test_no_augment_training_data_skips_a_strip_by_reason(tmp_path, good_image):
    rows = [["filepath", "caption"]] + [[good_image, f"a red square {i}"] for i in range(7)]
    rows.insert(3, [str(HOSTILE / "strip_1x100000.png"), "a strip"])
    rows.insert(5, [str(HOSTILE / "header_bomb_20000x5000.png"), "a bomb"])  # the decoder's limit, same reason
    rows.pop()
    with open(tmp_path / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    data = build_train_data(str(tmp_path / "data.csv"), EvalTransform(32), lambda t: torch.zeros(len(t), 4), 4)
    batches = list(data.batches(0))
    assert len(batches) == 2 and all(images.shape == (4, 3, 32, 32) for images, _ in batches)
    assert data.skip_counts() == {"too_many_pixels": 2}
    assert "strip_1x100000.png" in data.skip_examples()["too_many_pixels"]


# --------------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("command", ["classify", "explain", "eval"])
def test_device_cuda_without_a_gpu_is_a_clean_error(command, saved_tiny_model, good_image, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = {"classify": ["classify", good_image, "--labels", "a,b"], "explain": ["explain", good_image, "--texts", "a"],
            "eval": ["eval", "--task", "zeroshot", "--data", str(Path(good_image).parent)]}[command]
    assert main([*args, "--model", str(saved_tiny_model), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clipforge {command}: error: --device cuda: no CUDA GPU is available")
    assert "Traceback" not in err and "use --device cpu" in err


def test_resolve_device_is_the_one_check():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="--device cuda:7"):
        resolve_device("cuda:7")
    with pytest.raises(ValueError, match="--device cuda:7"):
        load("tiny-vit-does-not-matter", device="cuda:7")  # checked before anything is read


@pytest.mark.parametrize("value", ["0", "-5"])
def test_classify_and_eval_validate_the_batch_size(value, saved_tiny_model, good_image, capsys):
    assert main(["classify", good_image, "--model", str(saved_tiny_model), "--labels", "a,b",
                 "--batch-size", value]) == 2
    assert capsys.readouterr().err == f"clipforge classify: error: --batch-size must be a positive integer, got {value}\n"
    assert main(["eval", "--model", str(saved_tiny_model), "--task", "zeroshot", "--data", ".",
                 "--batch-size", value]) == 2
    assert f"--batch-size must be a positive integer, got {value}" in capsys.readouterr().err


def test_labels_that_tokenize_identically_are_repeats(saved_tiny_model, good_image, capsys):
    assert main(["classify", good_image, "--model", str(saved_tiny_model), "--labels", "cat,Cat,CAT"]) == 2
    assert "'Cat' and 'cat' tokenize identically (positions 1 and 2)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tokenize identically"):
        check_classnames(["a dog", "a  dog "])
    assert check_classnames(["ice cream", "icecream", "Cat", "cats"]) == ["ice cream", "icecream", "Cat", "cats"]


def test_latin1_files_name_the_file_and_a_bom_is_dropped(saved_tiny_model, good_image, tmp_path, capsys):
    latin1, bom = str(HOSTILE / "labels_latin1.txt"), str(HOSTILE / "labels_bom.txt")
    assert load_classnames(bom) == ["cat", "dog"]
    templates = tmp_path / "templates.txt"
    templates.write_bytes("\ufeffa photo of a {}.\n".encode())
    assert load_templates(str(templates)) == ["a photo of a {}."]
    runs = {"--classes": ["classify", good_image, "--classes", latin1],
            "--templates": ["classify", good_image, "--labels", "a,b", "--templates", str(_latin1_templates(tmp_path))],
            "--texts-file": ["explain", good_image, "--texts-file", latin1]}
    for option, args in runs.items():
        assert main([*args, "--model", str(saved_tiny_model)]) == 2
        err = capsys.readouterr().err
        assert "is not UTF-8 text" in err and "save it as UTF-8" in err and "Traceback" not in err, option
        assert ("labels_latin1.txt" if option != "--templates" else "templates_latin1.txt") in err
    assert main(["explain", good_image, "--texts-file", bom, "--model", str(saved_tiny_model)]) == 0
    assert "\ufeff" not in capsys.readouterr().out


def _latin1_templates(folder: Path) -> Path:
    path = folder / "templates_latin1.txt"
    path.write_bytes("une photo d'un {} célèbre.\n".encode("latin-1"))
    return path
