"""Experiment 1 of ``clipforge study`` (Radford et al. 2021, sec. 2.3, Fig. 2): the training objective's
efficiency, contrastive against bag-of-words prediction and captioning, on the built-in data.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clipforge.apps.study.figures import new_figure
from clipforge.apps.study.framework import (
    CHECKPOINT_FRACTIONS,
    Result,
    Study,
    mean_std,
    scored_checkpoints,
    train_with_checkpoints,
)
from clipforge.io.runs import is_complete, step_folders
from clipforge.models.config import OBJECTIVES

# The objectives compared, by their names in clipforge.models.config.OBJECTIVES (its "classify" is experiment
# 7's supervised classifier), as the report calls them.
OBJECTIVE_LABELS = {"contrastive": "contrastive (CLIP)", "bow": "bag-of-words prediction",
                    "caption": "Transformer language model"}
assert set(OBJECTIVE_LABELS) <= set(OBJECTIVES), "OBJECTIVE_LABELS names an objective models.config lacks"
# (more efficient, less efficient, the paper's ratio of images needed: Fig. 2's arrows)
PAPER_EFFICIENCY = (("contrastive", "bow", 4.0), ("bow", "caption", 3.0))
# The objectives train for the scale's steps / DIVISOR in whole eighths (at least 3, for a curve). A caption
# step, the decoder's output over the whole vocabulary at every predicted position, costs over ten
# contrastive ones; a divisor above 1 trades the curve's length for time.
OBJECTIVE_STEPS_DIVISOR, MIN_CURVE_STEPS = 1, 3
# Each curve point scores at most this many held-out images with one template: the caption model's scorer
# decodes every (image, class prompt) pair through the full vocabulary, the cost of the whole experiment.
CURVE_IMAGES = 128
Curve = Sequence[tuple[float, float]]  # (images seen, zero-shot top-1) in training order


@dataclass(frozen=True)
class Span:
    """A quantity known to lie in ``[low, high]``: equal ends for a value, ``0`` or ``inf`` for a one-sided
    bound; ``strict`` when the finite end of a one-sided bound is itself excluded (never reached)."""

    low: float
    high: float
    strict: bool = False

    @property
    def exact(self) -> bool:
        return self.low == self.high

    @property
    def undetermined(self) -> bool:
        return self.low == 0 and math.isinf(self.high)

    def describe(self, digits: int = 2, unit: str = "") -> str:
        """'4.1x', 'more than 2x' (or 'at least'), 'less than 0.5x' (or 'at most'), 'between 1.2x and 3x' or
        'undetermined'."""
        def show(v: float) -> str:
            return (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}") + unit
        if self.exact:
            return show(self.low)
        if self.undetermined:
            return "undetermined"
        if math.isinf(self.high):
            return f"{'more than' if self.strict else 'at least'} {show(self.low)}"
        if self.low == 0:
            return f"{'less than' if self.strict else 'at most'} {show(self.high)}"
        return f"between {show(self.low)} and {show(self.high)}"

    def to_dict(self) -> dict:
        return {"low": self.low, "high": None if math.isinf(self.high) else self.high, "strict": self.strict,
                "text": self.describe()}


def images_to_reach(curve: Curve, level: float) -> Span:
    """Images a run needs to first reach accuracy ``level``, linearly interpolated between its points.

    Reached at the first point: at most that point's images (nothing is known before it). Never reached:
    more than the run's length.
    """
    previous = None
    for images, accuracy in curve:
        if accuracy >= level:
            if previous is None:
                return Span(0.0, float(images))
            x0, a0 = previous
            value = x0 + (level - a0) / (accuracy - a0) * (images - x0)
            return Span(value, value)
        previous = (images, accuracy)
    return Span(float(curve[-1][0]), math.inf, strict=True)


def _divide(numerator: Span, denominator: Span) -> Span:
    low = numerator.low / denominator.high  # x / inf == 0
    high = numerator.high / denominator.low if denominator.low > 0 else math.inf
    return Span(low, high, numerator.strict or denominator.strict)


def efficiency(faster: Curve, slower: Curve, floor: float = 0.0) -> tuple[float, Span]:
    """How many times fewer images ``faster`` needs than ``slower`` to reach ``slower``'s final accuracy (the
    paper's Fig. 2 arrows), or ``floor`` if that is higher (an accuracy clearly above chance: matching a
    run that learnt nothing says nothing); returns (that accuracy, the ratio: slower's images / faster's)."""
    level = max(slower[-1][1], floor)
    return level, _divide(images_to_reach(slower, level), images_to_reach(faster, level))


def chance_floor(num_classes: int, num_images: int) -> float:
    """Chance accuracy plus two binomial standard errors: above it, a run has learnt something."""
    chance = 1 / num_classes
    return chance + 2 * math.sqrt(chance * (1 - chance) / num_images)


def mean_curve(curves: Sequence[Curve]) -> list[tuple[float, float]]:
    """The seeds' mean accuracy at each point (the runs share their steps, hence their images seen)."""
    return [(points[0][0], statistics.fmean(a for _, a in points)) for points in zip(*curves)]


def curve_steps(run_dir: Path) -> list[int]:
    """The kept checkpoints' steps at 1, 2, 4, ... times the first one, and the last: spaced evenly on a log
    axis of images seen, so the early, fast-changing part of training has points too."""
    steps = [step for step, folder in step_folders(run_dir) if is_complete(folder)]
    if not steps:
        raise RuntimeError(f"{run_dir} has no complete checkpoint to score; delete it and run the study again")
    doubling = [s for s in steps if s % steps[0] == 0 and (s // steps[0]) & (s // steps[0] - 1) == 0]
    return sorted(set(doubling) | {steps[-1]})


def accuracy_curve(study: Study, run_dir: Path, evalset) -> list[tuple[float, float]]:
    """Zero-shot top-1 against images seen, at the checkpoints of ``curve_steps``."""
    return scored_checkpoints(study, run_dir, lambda model, preprocess: study.zeroshot_top1(model, preprocess,
                                                                                            evalset),
                              curve_steps(run_dir))


def objectives(study: Study) -> Result:
    """Experiment 1 [sec. 2.3, Fig. 2]: one image tower trained contrastive, bag-of-words and captioning for
    the same images; zero-shot top-1 on held-out pairs against images seen, and the images-needed ratios."""
    evalset = curve_evalset(study.heldout())
    steps = objective_steps(study.scale.steps)
    curves = {name: [accuracy_curve(study, train_with_checkpoints(study, "objectives", name, seed, loss=name,
                                                                  steps=steps), evalset)
                     for seed in study.seed_range()] for name in OBJECTIVE_LABELS}
    means = {name: mean_curve(runs) for name, runs in curves.items()}
    floor = chance_floor(len(evalset.classnames), len(evalset.labels))
    ratios = {(fast, slow): efficiency(means[fast], means[slow], floor) for fast, slow, _ in PAPER_EFFICIENCY}
    verdict, agrees = _objectives_verdict(ratios, floor)
    return Result(
        name="objectives", title="Objective efficiency", section="2.3, Fig. 2",
        paper="Contrastive training reaches the bag-of-words model's zero-shot ImageNet accuracy with about 4x fewer "
              "images, and bag-of-words prediction the Transformer language model's with about 3x fewer (Fig. 2).",
        table=_objectives_table(curves, ratios, len(evalset.labels)),
        figure=_curves_figure(curves, ratios, 1 / len(evalset.classnames)),
        verdict=verdict, agrees=agrees, numbers=_objectives_numbers(curves, means, ratios, floor))


def objective_steps(scale_steps: int) -> int:
    """Steps of each objective's run: the scale's divided by ``OBJECTIVE_STEPS_DIVISOR``, in whole eighths
    (so the doubling checkpoints end at the last step), or at least ``MIN_CURVE_STEPS``."""
    steps = scale_steps // OBJECTIVE_STEPS_DIVISOR
    steps -= steps % CHECKPOINT_FRACTIONS
    return steps if steps >= CHECKPOINT_FRACTIONS else min(scale_steps, MIN_CURVE_STEPS)


def curve_evalset(evalset):
    """The first ``CURVE_IMAGES`` images of an evaluation set, with its first template only."""
    return dataclasses.replace(evalset, images=evalset.images[:CURVE_IMAGES], labels=evalset.labels[:CURVE_IMAGES],
                               templates=list(evalset.templates[:1]))


def _objectives_numbers(curves: dict, means: dict, ratios: dict, floor: float) -> dict:
    """The curves per seed, and per comparison its level, the images each run needed and their ratio (for the
    seeds' mean curves and for each seed's own pair of runs)."""
    comparisons = {}
    for fast, slow, _ in PAPER_EFFICIENCY:
        level, ratio = ratios[(fast, slow)]
        comparisons[f"{fast}/{slow}"] = {
            "level": level, "ratio": ratio.to_dict(),
            "images_needed": {name: images_to_reach(means[name], level).to_dict() for name in (fast, slow)},
            "ratio_per_seed": [efficiency(a, b, floor)[1].to_dict() for a, b in zip(curves[fast], curves[slow])]}
    return {"curves": curves, "chance_floor": floor, "comparisons": comparisons}


def _objectives_table(curves: dict, ratios: dict, num_images: int) -> list[dict]:
    rows = []
    for name, runs in curves.items():
        row = {"variant": OBJECTIVE_LABELS[name], "images seen": int(runs[0][-1][0]),
               f"zero-shot top-1 ({num_images} images, 1 template)": mean_std([run[-1][1] for run in runs]),
               "data efficiency": ""}
        for (fast, slow), (level, ratio) in ratios.items():
            if fast == name:
                row["data efficiency"] = (f"undetermined against {OBJECTIVE_LABELS[slow]}" if ratio.undetermined
                                          else f"{ratio.describe(unit='x')} {OBJECTIVE_LABELS[slow]}'s")
        rows.append(row)
    return rows


def _ratio_claim(fast: str, slow: str, paper: float, level: float, ratio: Span,
                 floor: float) -> tuple[str, bool | None]:
    """One comparison in words, and whether it agrees with the paper's direction (None: the runs cannot tell)."""
    target = "the latter's final accuracy" if level > floor else "an accuracy clearly above chance"
    if ratio.undetermined:
        return (f"these checkpoints cannot tell whether {OBJECTIVE_LABELS[fast]} is more data-efficient than "
                f"{OBJECTIVE_LABELS[slow]} (images to reach {target}, {level:.1%}; paper: about {paper:g}x)"), None
    text = (f"{OBJECTIVE_LABELS[fast]} was {ratio.describe(unit='x')} as data-efficient as {OBJECTIVE_LABELS[slow]} "
            f"(images each needed to reach {target}, {level:.1%}; paper: about {paper:g}x)")
    return text, True if ratio.low > 1 else False if ratio.high < 1 else None


def _objectives_verdict(ratios: dict, floor: float) -> tuple[str, bool | None]:
    claims = [_ratio_claim(fast, slow, paper, *ratios[(fast, slow)], floor) for fast, slow, paper in PAPER_EFFICIENCY]
    outcomes = [agrees for _, agrees in claims]
    agrees = False if False in outcomes else None if None in outcomes else True
    opening = {True: "Agrees in direction", False: "Does not agree", None: "Inconclusive"}[agrees]
    return f"{opening}: " + "; ".join(text for text, _ in claims) + ".", agrees


def _curves_figure(curves: dict, ratios: dict, chance: float):
    """Zero-shot top-1 against images seen (log axis) per objective, the comparison levels and chance."""
    figure = new_figure()
    axes = figure.add_subplot()
    for name, runs in curves.items():
        mean = mean_curve(runs)
        line, = axes.plot([x for x, _ in mean], [a for _, a in mean], marker="o", label=OBJECTIVE_LABELS[name])
        for run in runs if len(runs) > 1 else ():
            axes.plot([x for x, _ in run], [a for _, a in run], color=line.get_color(), alpha=0.25, linewidth=0.8)
    for level in {level for level, _ in ratios.values()}:
        axes.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    axes.axhline(chance, color="black", linestyle="--", linewidth=0.8, label="chance")
    summary = "\n".join(f"{fast} vs {slow}: {ratio.describe(unit='x')} (at {level:.1%})"
                        for (fast, slow), (level, ratio) in ratios.items())
    axes.text(0.98, 0.5, summary, transform=axes.transAxes, ha="right", va="center", fontsize=8, color="dimgrey")
    images = [x for x, _ in next(iter(curves.values()))[0]]
    axes.set_xscale("log", base=2)  # checkpoints at doubling steps
    axes.set_xticks(images, [f"{x:,.0f}" for x in images], fontsize=8)
    axes.minorticks_off()
    axes.set(xlabel="images seen", ylabel="zero-shot top-1 (held-out pairs)", title="Objective efficiency")
    axes.legend(fontsize=8, loc="upper left")
    return figure
