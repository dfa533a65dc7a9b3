"""The built-in demo: train a small CLIP on the generated shapes data on a CPU, then measure what the paper
measures — zero-shot transfer to colour–shape pairs never seen in training, retrieval, a linear probe, and
the gain from prompt ensembling — and write a short report with figures.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.data import ShapesDataset, class_names, templates, write_classification, write_shapes
from clipforge.encode import encode_images
from clipforge.evaluate import evaluate
from clipforge.evaluate.explain import plot_report, similarity_report
from clipforge.io.factory import load
from clipforge.io.runs import claim_output
from clipforge.models import get_model_config
from clipforge.runtime.threads import threads_beside_workers
from clipforge.train import TrainConfig, train
from clipforge.train.logger import read_metrics
from clipforge.zeroshot import ZeroShotClassifier

SINGLE_TEMPLATE = ["a photo of a {}."]
DEMO_MARKER = ".clipforge-demo"  # marks a folder the demo wrote, which a later demo run may overwrite
_claim_output = functools.partial(claim_output, marker=DEMO_MARKER, program="demo")
EVAL_BATCH = 256


@dataclass
class DemoConfig:
    """What the demo trains; the defaults take a few minutes on two CPU cores."""

    output: str = "demo_output"
    model: str = "tiny-vit"
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    train_samples: int = 50_000
    eval_samples: int = 400
    workers: int = 1
    seed: int = 0


def run_demo(cfg: DemoConfig) -> Path:
    """Generate data, train, evaluate and write ``report.md``; returns the report's path.

    Every setting is checked before anything is written, and ``cfg.output`` must be new, empty or a
    previous demo's folder (it holds the ``DEMO_MARKER`` file): the demo never replaces other files.
    """
    out = Path(cfg.output)
    train_cfg = _train_config(cfg, out / "run")
    _claim_output(out)
    data = _write_eval_data(out / "data", cfg.eval_samples)
    run_dir = out / "run"
    train(train_cfg)
    model, preprocess = load(run_dir, device="cpu")
    results = _evaluate(model, preprocess, data)
    results["zeroshot_all_pairs"] = _zeroshot_among_all_pairs(model, preprocess, cfg.eval_samples)
    figures = {"loss": _plot_loss(run_dir, out / "loss_curve.png"),
               "heatmap": _plot_heatmap(model, preprocess, out / "similarity_heatmap.png"),
               "examples": _plot_examples(model, preprocess, out / "examples.png")}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = out / "report.md"
    report.write_text(_report(results, figures, cfg), encoding="utf-8")
    return report


def _train_config(cfg: DemoConfig, run_dir: Path) -> TrainConfig:
    """The demo's training run, its settings checked (ValueError naming the option) before any file is written."""
    for name in ("steps", "batch_size", "eval_samples", "train_samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.eval_samples < 10:
        raise ValueError(f"--eval-samples must be at least 10 (the linear probe needs a validation split), "
                         f"got {cfg.eval_samples}")
    get_model_config(cfg.model)  # an unknown architecture fails here, not after the data is written
    return TrainConfig(model=cfg.model, train_data=f"builtin:{cfg.train_samples}", batch_size=cfg.batch_size,
                       steps=cfg.steps, lr=cfg.lr, warmup=max(1, cfg.steps // 10), output=str(run_dir),
                       workers=cfg.workers, threads=threads_beside_workers(cfg.workers), seed=cfg.seed,
                       save_every=max(1, cfg.steps // 4), log_every=10,
                       resume="auto", zeroshot_classes="builtin-heldout",
                       val_every=max(1, cfg.steps // 4)).validate()


def _write_eval_data(root: Path, n: int) -> dict[str, str]:
    """Held-out test and probe-training sets (different seeds than training), and a caption set."""
    return {
        "heldout_test": write_classification(root / "heldout_test", "heldout", n, seed=101),
        "heldout_train": write_classification(root / "heldout_train", "heldout", n, seed=102),
        "captions": write_shapes(root / "captions", n, split="all", fmt="csv", seed=103),
    }


def _evaluate(model, preprocess, data: dict[str, str]) -> dict[str, dict[str, float]]:
    test = data["heldout_test"]
    return {
        "zeroshot_ensemble": evaluate(model, preprocess, "zeroshot", data=test, templates=templates()),
        "zeroshot_single": evaluate(model, preprocess, "zeroshot", data=test, templates=SINGLE_TEMPLATE),
        "linear_probe": evaluate(model, preprocess, "linear-probe", data=test, train_data=data["heldout_train"]),
        "retrieval": evaluate(model, preprocess, "retrieval", data=data["captions"]),
    }


@torch.no_grad()
def _zeroshot_among_all_pairs(model, preprocess, n: int) -> dict[str, float]:
    """Top-1 on images of unseen pairs when every colour-shape pair (seen or not) is a candidate: the model
    must prefer the never-seen combination over seen ones that share its colour or its shape."""
    data = ShapesDataset(n, "heldout", seed=101)
    names = class_names("all")
    targets = torch.tensor([names.index(data.class_name(i, "pair")) for i in range(n)])
    classifiers = {"top1_ensemble": ZeroShotClassifier(model, names, templates()),
                   "top1_single": ZeroShotClassifier(model, names, SINGLE_TEMPLATE)}
    batches = (torch.stack([preprocess(data.image(i)) for i in range(start, min(n, start + EVAL_BATCH))])
               for start in range(0, n, EVAL_BATCH))  # preprocessed a batch at a time
    features = encode_images(model, batches)  # (n, D), encoded once for both classifiers
    results = {key: float((c.logits(features).argmax(dim=-1) == targets).float().mean())
               for key, c in classifiers.items()}
    results["chance"] = 1 / len(names)
    return results


def _plot_loss(run_dir: Path, path: Path) -> Path:
    from matplotlib.figure import Figure

    records = [r for r in read_metrics(run_dir) if "loss" in r and r.get("split", "train") == "train"]
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


def _heldout_images(count: int, seed: int = 7):
    """One image of each of the first ``count`` held-out classes, with the list of class names."""
    data = ShapesDataset(200, "heldout", seed=seed, image_size=64)
    names, chosen = data.class_names(), {}
    for i in range(len(data)):
        chosen.setdefault(data.label(i), i)
    picks = [chosen[c] for c in sorted(chosen)[:count]]
    return data, names, picks


def _plot_heatmap(model, preprocess, path: Path) -> Path:
    data, names, picks = _heldout_images(6)
    images = [data.image(i) for i in picks]
    texts = [f"a photo of a {names[data.label(i)]}." for i in picks]
    report = similarity_report(model, torch.stack([preprocess(im) for im in images]), texts,
                               [names[data.label(i)] for i in picks])
    return plot_report(report, images, path)


def _plot_examples(model, preprocess, path: Path) -> Path:
    from matplotlib.figure import Figure

    data, names, picks = _heldout_images(8)
    classifier = ZeroShotClassifier(model, names, templates())
    probs = classifier.probabilities(classifier.encode_images(torch.stack([preprocess(data.image(i)) for i in picks])))
    fig = Figure(figsize=(2.2 * len(picks), 2.9), layout="constrained")
    for ax, i, p in zip(fig.subplots(1, len(picks)), picks, probs):
        best = int(p.argmax())
        ax.imshow(data.image(i))
        ax.set_axis_off()
        ok = best == data.label(i)
        ax.set_title(f"{names[best]} ({p[best]:.0%})\ntrue: {names[data.label(i)]}", fontsize=9,
                     color="darkgreen" if ok else "firebrick")
    fig.suptitle("zero-shot predictions on colour-shape pairs never seen in training")
    fig.savefig(path, dpi=110)
    return path


def _report(results: dict, figures: dict[str, Path], cfg: DemoConfig) -> str:
    ens, single = results["zeroshot_ensemble"], results["zeroshot_single"]
    every, retrieval = results["zeroshot_all_pairs"], results["retrieval"]
    n_unseen, n_all = len(class_names("heldout")), len(class_names("all"))
    lines = [
        "# clipforge demo report", "",
        f"A `{cfg.model}` CLIP trained for {cfg.steps} steps (batch {cfg.batch_size}) on the built-in "
        f"coloured-shapes captions. {n_unseen} colour–shape pairs never appear in training; classifying "
        "images of exactly those pairs, from the pairs' names alone, measures zero-shot transfer.", "",
        f"| measurement (images of the {n_unseen} unseen pairs) | {len(templates())} templates ensembled "
        "| one template | chance |", "|---|---|---|---|",
        f"| zero-shot top-1, candidates: the {n_unseen} unseen pairs | {ens['top1']:.1%} | {single['top1']:.1%} "
        f"| {1 / n_unseen:.1%} |",
        f"| zero-shot top-1, candidates: all {n_all} pairs | {every['top1_ensemble']:.1%} "
        f"| {every['top1_single']:.1%} | {every['chance']:.1%} |",
        f"| linear probe top-1 (trained on labelled images of the unseen pairs) | "
        f"{results['linear_probe']['top1']:.1%} | | {1 / n_unseen:.1%} |", "",
        f"Retrieval on {cfg.eval_samples} captioned images: image→text recall@1/5/10 "
        f"{retrieval['image_to_text_recall@1']:.1%} / {retrieval['image_to_text_recall@5']:.1%} / "
        f"{retrieval['image_to_text_recall@10']:.1%}, text→image "
        f"{retrieval['text_to_image_recall@1']:.1%} / {retrieval['text_to_image_recall@5']:.1%} / "
        f"{retrieval['text_to_image_recall@10']:.1%} (many captions fit several images equally well).", "",
        "Prompt ensembling averages the normalised text embeddings of several phrasings of each class "
        f"({every['top1_ensemble'] - every['top1_single']:+.1%} among all pairs here). Among all pairs the "
        "model must prefer the never-seen combination over seen pairs sharing its colour or its shape. The "
        "linear probe sees labels, so it is an upper reference for what the image features hold.", "",
        f"![training loss]({figures['loss'].name})", "",
        f"![zero-shot predictions]({figures['examples'].name})", "",
        "Cosine similarities and softmax probabilities between images and texts "
        "(what `clipforge explain` draws):", "",
        f"![similarity heatmap]({figures['heatmap'].name})", "",
    ]
    return "\n".join(lines)


def search_own_images(cfg: DemoConfig, queries: tuple[str, str] = ("a blue cross", "id:1"), top_k: int = 3) -> str:
    """Index the demo's own images (the held-out test folder and the captioned set) with the trained model,
    run two example searches, and say how to browse them with ``clipforge serve``."""
    from clipforge.search import Index

    out = Path(cfg.output)
    folder = out / "index"
    sources = [out / "data" / "heldout_test", out / "data" / "captions" / "captions.csv"]
    index = Index.build(folder, sources, model=str(out / "run"), device="cpu", workers=cfg.workers, progress=False,
                        rebuild=True)  # the model was just (re)trained
    lines = [f"Indexed {len(index)} demo images into {folder}."]
    for query in queries:
        lines.append(f"\n$ clipforge search {folder} {query!r} --top {top_k}")
        lines += [f"{r.score:7.4f}  id:{r.id:<5d} {r.path}" for r in index.search(query, top_k=top_k)]
    lines.append(f"\nBrowse them in a web page: clipforge serve {folder}  (then open http://127.0.0.1:8000/)")
    return "\n".join(lines)
