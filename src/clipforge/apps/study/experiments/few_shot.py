"""Experiment 6 of ``clipforge study`` (Radford et al. 2021, sec. 3.2, Fig. 6): zero-shot against few-shot
logistic-regression probes on the same image features, on the built-in data.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch

from clipforge.apps.study.figures import new_figure
from clipforge.apps.study.framework import EVAL_SEED, Result, Study, mean_std
from clipforge.encode import encode_images
from clipforge.evaluate.linear_probe import fit_logistic_regression, sample_k_shot, select_l2

PROBE_VAL_PER_CLASS = 4  # labelled images per class that choose the probe's L2 strength
PROBE_POOL_PER_SHOT = 3  # images per class per shot in the pool the k-shot sets are drawn from
PROBE_POOL_EXTRA = 8  # ... plus these, so that every class of the random draw has its k images


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
