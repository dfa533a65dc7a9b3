"""CLIP_benchmark users: the built-in data written with ``fmt="clip_benchmark"`` is read by CLIP_benchmark's
own ``wds/`` loader and scored by its own zero-shot metric with clipforge's loader, giving ``clipforge eval``'s
top-1. CLIP_benchmark's ``datasets.builder`` module imports torchvision (not a clipforge dependency), so its
``build_wds_dataset`` function is taken from the installed source alone; it needs only ``os`` and webdataset."""
import ast
import inspect
import json
import os
from pathlib import Path

import pytest
import torch

zeroshot_metric = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                                      reason="pip install --no-deps clip-benchmark (it would pull torchvision)")
pytest.importorskip("webdataset")

from clipforge.cli import main  # noqa: E402
from clipforge.data.shapes import write_classification  # noqa: E402
from clipforge.evaluate.benchmark_loader import load_clipforge  # noqa: E402

NUM_SAMPLES = 40


def _build_wds_dataset():
    """CLIP_benchmark's ``build_wds_dataset``, compiled from its installed builder.py without importing it."""
    spec = __import__("importlib.util").util.find_spec("clip_benchmark.datasets")
    source = Path(spec.submodule_search_locations[0], "builder.py").read_text()
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "build_wds_dataset")
    namespace = {"os": os}
    exec(compile(ast.Module([function], []), "clip_benchmark/datasets/builder.py", "exec"), namespace)
    return namespace["build_wds_dataset"]


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory):
    return write_classification(tmp_path_factory.mktemp("cb") / "heldout", "heldout", NUM_SAMPLES,
                                fmt="clip_benchmark", samples_per_shard=16)


def test_layout_is_clip_benchmarks(benchmark_root):
    root = Path(benchmark_root)
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    assert (root / "test" / "nshards.txt").read_text().strip() == "3"
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t and "{}" not in t for t in templates)


def test_clip_benchmark_reads_it_and_gives_clipforge_evals_top1(benchmark_root, saved_tiny_model, tmp_path):
    model, transform, tokenizer = load_clipforge(str(saved_tiny_model), device="cpu")
    dataset = _build_wds_dataset()("heldout", transform=transform, split="test", data_dir=benchmark_root)
    root = Path(benchmark_root)
    assert dataset.classes == (root / "classnames.txt").read_text().splitlines()
    loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None, num_workers=0)
    # CLIP_benchmark's own classifier and loop; its ``accuracy`` helper calls float() on a 1-element array,
    # which NumPy >= 2.4 refuses (an upstream bug), so top-1 is counted here from its logits
    classifier = zeroshot_metric.zero_shot_classifier(model, tokenizer, dataset.classes, dataset.templates, "cpu",
                                                      amp=False)
    logits, target = zeroshot_metric.run_classification(model, classifier, loader, "cpu", amp=False)
    assert len(target) == NUM_SAMPLES
    theirs = {"acc1": (logits.argmax(1) == target).float().mean().item()}
    folder = write_classification(tmp_path / "folder", "heldout", NUM_SAMPLES, fmt="folder")  # the same images
    assert main(["eval", "--task", "zeroshot", "--model", str(saved_tiny_model), "--data", folder,
                 "--classnames", str(root / "classnames.txt"), "--templates", str(root / "templates.txt"),
                 "--output", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert theirs["acc1"] == pytest.approx(_top1(ours), abs=1e-9)


def _top1(report: dict) -> float:
    metrics = report.get("metrics", report)
    return next(v for k, v in metrics.items() if k in ("top1", "acc1", "zeroshot_top1"))


def test_numbered_class_folders_read_by_id_and_a_missing_class_stays_a_candidate(tmp_path, saved_tiny_model):
    """Index-labelled exports: folders 0000, 0002 (no 0001: that class has no images) with a names file."""
    from clipforge.data.classification import read_classification

    source = Path(write_classification(tmp_path / "shapes", "heldout", 12, fmt="folder"))
    classnames = (source / "classnames.txt").read_text().splitlines()
    root = tmp_path / "numbered"
    for label in (0, 2):
        (root / f"{label:04d}").mkdir(parents=True)
        for image in sorted((source / classnames[label].replace(" ", "_")).glob("*.png")):
            image.rename(root / f"{label:04d}" / image.name)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(classnames) + "\n")
    with pytest.warns(UserWarning, match="have no images"):
        data = read_classification(root, str(names))
    assert data.classnames == classnames  # every name, in label order, the missing ones included
    assert data.targets and {data.classnames[t] for t in data.targets} <= {classnames[0], classnames[2]}
    assert main(["eval", "--task", "zeroshot", "--model", str(saved_tiny_model), "--data", str(root),
                 "--classnames", str(names), "--output", str(tmp_path / "out.json")]) == 0
    details = json.loads((tmp_path / "out.json").read_text())["details"]
    assert details["num_classes"] == len(classnames) and details["num_images"] == len(data.targets)
