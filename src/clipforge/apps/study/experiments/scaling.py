"""Experiment 8 of ``clipforge study`` (Radford et al. 2021, sec. 3.1, Fig. 9): zero-shot accuracy against
training compute, models of several sizes trained on the same data for the same steps.
"""
from __future__ import annotations

import statistics

import torch

from clipforge.apps.study.figures import new_figure
from clipforge.apps.study.framework import Result, Study, compare, mean_std
from clipforge.data import shapes
from clipforge.io.factory import create_model
from clipforge.loss import contrastive_loss
from clipforge.tokenizer import model_tokenizer


def training_flops(model_config, batch_size: int, steps: int) -> float:
    """Floating-point operations of a contrastive training run: one step's forward and backward on a batch
    of built-in images and captions, counted by ``torch.utils.flop_counter``, times ``steps``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(model_config)
    data = shapes.ShapesDataset(batch_size, "train", seed=0, image_size=model.image_size)
    images = torch.randn(batch_size, 3, model.image_size, model.image_size)
    tokens = model_tokenizer(model)([data.caption(i) for i in range(batch_size)])
    with FlopCounterMode(display=False) as counter:
        loss = contrastive_loss(model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True),
                                model.logit_scale.exp())
        loss.backward()
    return float(counter.get_total_flops()) * steps


def size_name(model_config) -> str:
    """A model size in words: its towers' width and depth, and its parameters outside the token embedding."""
    model = create_model(model_config)
    config = model.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.endswith("token_embedding.weight"))
    rest = sum(p.numel() for p in model.parameters()) - embedding
    layers = config.vision_cfg.layers
    return (f"width {config.vision_cfg.width}, {layers} layer{'s' if layers != 1 else ''} "
            f"({rest / 1e6:.2g}M parameters + token embedding)")


def scaling(study: Study) -> Result:
    """Experiment 8 [Fig. 9]: models of the scale's ``sizes`` trained on the same data for the same steps;
    zero-shot top-1 against training FLOPs."""
    scale, evalset = study.scale, study.heldout()
    rows, top1, flops = [], {}, {}
    for index, size in enumerate(scale.sizes):
        config = study.model_file(size)
        name = size_name(config)
        runs = [study.baseline(seed) if size == scale.model else study.train("scaling", f"size{index}", seed,
                                                                            model=config) for seed in study.seed_range()]
        top1[name] = [study.zeroshot_top1(*study.load(run), evalset) for run in runs]
        flops[name] = training_flops(config, scale.batch_size, scale.steps)
        rows.append({"variant": name, "training FLOPs": f"{flops[name]:.3g}", "zero-shot top-1": mean_std(top1[name])})
    verdict, agrees = _scaling_verdict(list(top1.values()), len(evalset.labels))
    return Result(
        name="scaling", title="Zero-shot accuracy against training compute", section="3.1, Fig. 9",
        paper="Over 5 ResNet CLIP models spanning 44x in compute, average zero-shot error falls smoothly, close "
              "to a log-log linear trend in training compute (Fig. 9, 39 evaluations on 36 datasets).",
        table=rows, figure=_scaling_figure(flops, top1), verdict=verdict, agrees=agrees,
        numbers={"zeroshot_top1": top1, "training_flops": flops})


def _scaling_verdict(accuracies: list[list[float]], num_images: int) -> tuple[str, bool | None]:
    """Agrees when every larger model beats the next smaller one; not when one is worse beyond the noise."""
    steps = [compare(bigger, smaller, num_images) for smaller, bigger in zip(accuracies, accuracies[1:])]
    if all(difference > 0 for difference, _, _ in steps):
        agrees = True
    elif any(difference < 0 and not within for difference, _, within in steps):
        agrees = False
    else:
        agrees = None
    gains = ", ".join(f"{d:+.1%} (noise +/-{m:.1%})" for d, m, _ in steps)
    opening = {True: "Agrees", False: "Does not agree", None: "Inconclusive"}[agrees]
    return f"{opening}: zero-shot top-1 changes by {gains} from each model size to the next larger.", agrees


def _scaling_figure(flops: dict[str, float], top1: dict[str, list[float]]):
    figure = new_figure()
    axes = figure.add_subplot()
    names = list(flops)
    means = [statistics.fmean(top1[n]) for n in names]
    errors = [statistics.stdev(top1[n]) if len(top1[n]) > 1 else 0.0 for n in names]
    axes.errorbar([flops[n] for n in names], means, yerr=errors, marker="o", capsize=4)
    for name, mean in zip(names, means):
        axes.annotate(name.split(" (")[0], (flops[name], mean), textcoords="offset points", xytext=(0, 8),
                      ha="center", fontsize=8)
    axes.set_xscale("log")
    axes.margins(x=0.15)
    axes.minorticks_off()
    axes.set_xticks([flops[n] for n in names], [f"{flops[n]:.2g}" for n in names])
    axes.set(xlabel="training FLOPs", ylabel="zero-shot top-1 (held-out pairs)", ylim=(0, 1),
             title="Compute scaling")
    return figure
