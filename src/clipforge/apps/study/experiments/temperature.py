"""Experiment 3 of ``clipforge study`` (Radford et al. 2021, sec. 2.5): the learned softmax temperature
against fixed ones, on the built-in data.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from clipforge.apps.study.figures import bar_figure
from clipforge.apps.study.framework import Result, Study, compare, margin_caveat, mean_std

FIXED_TEMPERATURES = (0.01, 0.07, 0.5)
MAX_LOGIT_SCALE = 100.0  # CLIP clips exp(logit_scale) here (sec. 2.5)


def _top1_and_scale(study: Study, run_dir: Path, evalset) -> tuple[float, float]:
    """Zero-shot top-1 of a run's newest checkpoint and its logit scale exp(logit_scale) = 1 / temperature."""
    model, preprocess = study.load(run_dir)
    return study.zeroshot_top1(model, preprocess, evalset), float(model.logit_scale.detach().exp())


def temperature(study: Study) -> Result:
    """Experiment 3 [sec. 2.5]: the learned temperature (the baseline run) against fixed ones."""
    evalset = study.heldout()
    runs = {"learned": [study.baseline(seed) for seed in study.seed_range()]}
    runs.update({f"fixed {t:g}": [study.train("temperature", f"fixed-{t:g}", seed, fixed_temperature=t)
                                  for seed in study.seed_range()] for t in FIXED_TEMPERATURES})
    measured = {name: [_top1_and_scale(study, run, evalset) for run in found] for name, found in runs.items()}
    top1 = {name: [a for a, _ in pairs] for name, pairs in measured.items()}
    learned_scale = [s for _, s in measured["learned"]]
    verdict, agrees = _temperature_verdict(top1, learned_scale, len(evalset.labels))
    return Result(
        name="temperature", title="Learned against fixed temperature", section="2.5",
        paper="CLIP learns the softmax temperature as a log-parameterised scalar, initialised to 0.07 and clipped so "
              "that it never scales the logits by more than 100, which the authors found necessary to prevent "
              "training instability; the paper gives no ablation numbers for it.",
        table=[{"variant": name, "zero-shot top-1": mean_std(values),
                "final temperature": mean_std([1 / s for _, s in measured[name]])} for name, values in top1.items()],
        figure=bar_figure("Softmax temperature", top1), verdict=verdict, agrees=agrees,
        numbers={"zeroshot_top1": top1, "learned_logit_scale": learned_scale})


def _temperature_verdict(top1: dict, learned_scale: Sequence[float], num_images: int) -> tuple[str, bool]:
    """Whether learning the temperature did as well as the best hand-set one (what it is meant to spare)."""
    best = max((name for name in top1 if name != "learned"), key=lambda n: statistics.fmean(top1[n]))
    difference, margin, same = compare(top1["learned"], top1[best], num_images)
    agrees = same or difference > 0
    scale = statistics.fmean(learned_scale)
    clipped = sum(s >= MAX_LOGIT_SCALE * (1 - 1e-4) for s in learned_scale)
    return (f"{'Agrees' if agrees else 'Does not agree'}: the learned temperature (ending at {1 / scale:.3g}, "
            f"clipped at 1/{MAX_LOGIT_SCALE:g} in {clipped} of {len(learned_scale)} runs) is {difference:+.1%} "
            f"zero-shot top-1 from the best fixed one ({best}), noise margin +/-{margin:.1%}"
            f"{margin_caveat(len(learned_scale))}."), agrees
