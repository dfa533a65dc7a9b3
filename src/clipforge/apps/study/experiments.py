"""Experiments 4, 5, 6 and 8 of ``clipforge study`` (Radford et al. 2021): the text encoder (sec. 2.4-2.5),
prompt engineering and ensembling (sec. 3.1.4), zero-shot against few-shot linear probes (sec. 3.2, Fig. 6)
and zero-shot accuracy against training compute (Fig. 9), on the built-in data.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch

from clipforge.data import shapes
from clipforge.encode import encode_images
from clipforge.evaluate.linear_probe import fit_logistic_regression, sample_k_shot, select_l2
from clipforge.io.factory import create_model
from clipforge.loss import contrastive_loss
from clipforge.tokenizer import model_tokenizer
from clipforge.zeroshot import DEFAULT_TEMPLATES

from clipforge.apps.study.core import EVAL_SEED, Result, Study, mean_std
from clipforge.apps.study.objectives import against_baseline, compare, final_top1
from clipforge.apps.study.report import bar_figure, new_figure

PROBE_VAL_PER_CLASS = 4  # labelled images per class that choose the probe's L2 strength
PROBE_POOL_PER_SHOT = 3  # images per class per shot in the pool the k-shot sets are drawn from
PROBE_POOL_EXTRA = 8  # ... plus these, so that every class of the random draw has its k images


# ------------------------------------------------------------------------------ 4. text encoder
def text_encoder(study: Study) -> Result:
    """Experiment 4 [sec. 2.4-2.5]: the baseline's causal Transformer text encoder against a continuous
    bag-of-words (CBOW) encoder (mean of token embeddings), same image tower, data and steps."""
    evalset = study.heldout()
    cbow = study.model_file(study.scale.model, text_cfg={"encoder": "cbow"})
    runs = against_baseline(study, "Transformer", "CBOW", "text-encoder", "cbow", model=cbow)
    top1 = {name: [final_top1(study, run, evalset) for run in found] for name, found in runs.items()}
    difference, margin, same = compare(top1["CBOW"], top1["Transformer"], len(evalset.labels))
    verdict = (f"{'Agrees' if same else 'Does not agree'}: the CBOW text encoder's zero-shot top-1 is "
               f"{difference:+.1%} from the Transformer's, {'within' if same else 'outside'} the noise margin of "
               f"+/-{margin:.1%}: {'little' if same else 'clear'} sensitivity to the text encoder at this scale.")
    return Result(
        name="text-encoder", title="Transformer against CBOW text encoder", section="2.4-2.5, Fig. 2",
        paper="The contrastive model of Fig. 2 already uses a bag-of-words text encoder, and the authors found "
              "CLIP's performance less sensitive to the text encoder's capacity than to the image encoder's "
              "(sec. 2.5: they widen the text Transformer only, never deepen it); no direct Transformer-vs-CBOW "
              "number is given.",
        table=[{"variant": name, "zero-shot top-1": mean_std(top1[name])} for name in runs],
        figure=bar_figure("Text encoder", top1), verdict=verdict, agrees=same,
        numbers={"zeroshot_top1": top1, "difference": difference, "noise_margin": margin})


# --------------------------------------------------------------------------------- 5. prompts
def prompt_variants() -> dict[str, list[str]]:
    """The three ways of turning a class name into text that experiment 5 compares."""
    ensemble = shapes.templates()
    return {"class name only": ["{}"], f"one template ({DEFAULT_TEMPLATES[0]!r})": list(DEFAULT_TEMPLATES),
            f"ensemble of {len(ensemble)} templates": ensemble}


def prompts(study: Study) -> Result:
    """Experiment 5 [sec. 3.1.4]: zero-shot top-1 of the baseline with the bare class name, one template and
    the ensemble of the built-in data's templates (mean of normalised prompt embeddings); no training."""
    evalset, variants = study.heldout(), prompt_variants()
    models = [study.load(study.baseline(seed)) for seed in study.seed_range()]
    top1 = {name: [study.zeroshot_top1(model, preprocess, evalset, templates) for model, preprocess in models]
            for name, templates in variants.items()}
    bare, single, ensemble = (top1[name] for name in variants)
    gain, margin, within = compare(ensemble, bare, len(evalset.labels))
    step = statistics.fmean(single) - statistics.fmean(bare)
    agrees = None if within else gain > 0
    opening = {True: "Agrees", False: "Does not agree", None: "Inconclusive"}[agrees]
    verdict = (f"{opening}: the ensemble is {gain:+.1%} from the bare class name (noise margin +/-{margin:.1%}); "
               f"the single template alone gives {step:+.1%}.")
    return Result(
        name="prompts", title="Prompt engineering and ensembling", section="3.1.4, Fig. 4",
        paper="On ImageNet the prompt 'A photo of a {label}.' improves zero-shot accuracy by 1.3 points over the "
              "bare class name, and ensembling 80 prompts adds 3.5 points more: almost 5 points together "
              "(over 36 datasets, Fig. 4: about 5 points on average).",
        table=[{"variant": name, "zero-shot top-1": mean_std(top1[name])} for name in variants],
        figure=bar_figure("Prompts", top1), verdict=verdict, agrees=agrees,
        numbers={"zeroshot_top1": top1, "ensemble_minus_bare": gain, "template_minus_bare": step,
                 "noise_margin": margin})


# ------------------------------------------------------------------------------- 6. few-shot
def _features(model, evalset) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) image embeddings in float64, as the linear probe uses them, and labels."""
    return encode_images(model, evalset.images, normalize=False).double(), evalset.labels


def probe_accuracy(pool, val, test, num_classes: int, k: int, seed: int, draws: int) -> float:
    """Test top-1 of a logistic-regression probe on ``k`` images per class drawn from ``pool`` (features,
    labels), its L2 strength chosen on ``val``; the mean over ``draws`` draws of the k images."""
    accuracies = []
    for draw in range(draws):
        keep = sample_k_shot(pool[1], k, seed=seed * draws + draw)
        x, y = pool[0][keep], pool[1][keep]
        l2, _ = select_l2(x, y, val[0], val[1], num_classes)
        probe = fit_logistic_regression(x, y, num_classes, l2)
        accuracies.append(float((probe.logits(test[0]).argmax(dim=-1) == test[1]).double().mean()))
    return statistics.fmean(accuracies)


def matching_shots(shots: Sequence[int], accuracies: Sequence[float], zero_shot: float) -> float | None:
    """The number of shots at which the probe's accuracy reaches zero-shot's, interpolated linearly in
    log2(k) between the measured k; ``shots[0]`` if it is reached at once, None if never."""
    previous = None
    for k, accuracy in zip(shots, accuracies):
        if accuracy >= zero_shot:
            if previous is None:
                return float(k)
            k0, a0 = previous
            fraction = (zero_shot - a0) / (accuracy - a0)
            return 2 ** (math.log2(k0) + fraction * (math.log2(k) - math.log2(k0)))
        previous = (k, accuracy)
    return None


def few_shot(study: Study) -> Result:
    """Experiment 6 [sec. 3.2, Fig. 6]: zero-shot top-1 of the baseline against logistic-regression probes on
    its image features trained with k labelled images per held-out class; at what k the probe matches it."""
    shots, test = study.scale.probe_shots, study.heldout()
    num_classes = len(test.classnames)
    pool_size = (PROBE_POOL_PER_SHOT * max(shots) + PROBE_POOL_EXTRA) * num_classes
    pool_set = study.labelled("heldout", n=pool_size, seed=EVAL_SEED + 1)
    val_set = study.labelled("heldout", n=PROBE_VAL_PER_CLASS * num_classes, seed=EVAL_SEED + 2)
    zero, probes = [], {k: [] for k in shots}
    for seed in study.seed_range():
        model, preprocess = study.load(study.baseline(seed))
        zero.append(study.zeroshot_top1(model, preprocess, test))
        pool, val, test_features = (_features(model, s) for s in (pool_set, val_set, test))
        for k in study.track(shots, f"few-shot probes, seed {seed}"):
            probes[k].append(probe_accuracy(pool, val, test_features, num_classes, k, seed, study.scale.probe_draws))
    means = [statistics.fmean(probes[k]) for k in shots]
    k_star = matching_shots(shots, means, statistics.fmean(zero))
    beats = {k: statistics.fmean(zero) > statistics.fmean(probes[k]) for k in shots if k in (1, 2)}
    agrees = all(beats.values()) if beats else None
    return Result(
        name="few-shot", title="Zero-shot against few-shot linear probes", section="3.2, Fig. 6-7",
        paper="Zero-shot CLIP matches the average accuracy of a 4-shot logistic-regression probe on the same "
              "features, and beats the 1- and 2-shot probes (Fig. 6, averaged over 20 datasets).",
        table=[{"variant": "zero-shot", "top-1": mean_std(zero)}]
        + [{"variant": f"{k}-shot linear probe", "top-1": mean_std(probes[k])} for k in shots],
        figure=_few_shot_figure(shots, means, statistics.fmean(zero), k_star),
        verdict=_few_shot_verdict(k_star, beats, shots, agrees), agrees=agrees,
        numbers={"zeroshot_top1": zero, "probe_top1": {str(k): v for k, v in probes.items()},
                 "matching_shots": k_star, "probe_draws": study.scale.probe_draws})


def _few_shot_verdict(k_star: float | None, beats: dict, shots: Sequence[int], agrees: bool | None) -> str:
    if k_star is None:
        where = f"no probe up to {max(shots)} shots reaches zero-shot"
    elif k_star == shots[0]:
        where = f"the {shots[0]}-shot probe already matches zero-shot"
    else:
        where = f"the probe matches zero-shot at about {k_star:.1f} shots (paper: about 4)"
    wins = ", ".join(f"{'beats' if won else 'does not beat'} the {k}-shot probe" for k, won in beats.items())
    opening = {True: "Agrees", False: "Does not agree", None: "Inconclusive"}[agrees]
    return f"{opening}: {where}; zero-shot {wins or 'was not compared with 1- and 2-shot probes'}."


def _few_shot_figure(shots, means, zero_shot: float, k_star: float | None):
    figure = new_figure()
    axes = figure.add_subplot()
    axes.plot(shots, means, marker="o", label="linear probe on the same features")
    axes.axhline(zero_shot, color="firebrick", linestyle="--", label="zero-shot")
    if k_star is not None:
        axes.axvline(k_star, color="grey", linestyle=":", linewidth=0.8)
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(shots), [str(k) for k in shots])
    axes.set(xlabel="labelled images per class", ylabel="top-1 (held-out pairs)", ylim=(0, 1),
             title="Zero-shot against few-shot probes")
    axes.legend(fontsize=8, loc="lower right")
    return figure


# -------------------------------------------------------------------------------- 8. scaling
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
