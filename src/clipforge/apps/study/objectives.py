"""Experiments 1-3 of ``clipforge study`` (Radford et al. 2021): the training objective's efficiency (sec. 2.3,
Fig. 2), the projection head (sec. 2.4) and the learned temperature (sec. 2.5), on the built-in data.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clipforge.io.runs import RUN_CONFIG_NAME, is_complete, step_folders
from clipforge.train.logger import read_metrics

from clipforge.apps.study.core import Result, Study, mean_std
from clipforge.apps.study.report import bar_figure, new_figure

OBJECTIVES = {"contrastive": "contrastive (CLIP)", "bow": "bag-of-words prediction",
              "caption": "Transformer language model"}
# (more efficient, less efficient, the paper's ratio of images needed: Fig. 2's arrows)
PAPER_EFFICIENCY = (("contrastive", "bow", 4.0), ("bow", "caption", 3.0))
# The objectives train for the scale's steps / DIVISOR in whole eighths (at least 3, for a curve). A caption
# step, the decoder's output over the whole vocabulary at every predicted position, costs over ten
# contrastive ones; a divisor above 1 trades the curve's length for time.
OBJECTIVE_STEPS_DIVISOR, MIN_CURVE_STEPS = 1, 3
CHECKPOINT_FRACTIONS = 8  # a checkpoint every eighth of the run; scored at 1/8, 1/4, 1/2 and the end
# Each curve point scores at most this many held-out images with one template: the caption model's scorer
# decodes every (image, class prompt) pair through the full vocabulary, the cost of the whole experiment.
CURVE_IMAGES = 128
FIXED_TEMPERATURES = (0.01, 0.07, 0.5)
MAX_LOGIT_SCALE = 100.0  # CLIP clips exp(logit_scale) here (sec. 2.5)
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


def noise_margin(a: Sequence[float], b: Sequence[float], num_images: int) -> float:
    """Two standard errors of the difference of two mean accuracies: each mean's error combines the evaluation
    images' binomial error (the same images for every seed, so it does not average out) and the seeds' spread."""
    def variance(values: Sequence[float]) -> float:
        p = statistics.fmean(values)
        spread = statistics.variance(values) / len(values) if len(values) > 1 else 0.0
        return p * (1 - p) / num_images + spread
    return 2 * math.sqrt(variance(a) + variance(b))


def margin_caveat(seeds: int) -> str:
    """What a noise margin leaves out when there is one seed: the spread between training runs."""
    return "; one seed, so the spread between training runs is not in it" if seeds == 1 else ""


def compare(a: Sequence[float], b: Sequence[float], num_images: int) -> tuple[float, float, bool]:
    """(mean of a minus mean of b, the noise margin, whether the difference is within it)."""
    difference = statistics.fmean(a) - statistics.fmean(b)
    margin = noise_margin(a, b, num_images)
    return difference, margin, abs(difference) <= margin


def images_per_step(run_dir: Path) -> int:
    """The global batch of a (single-process) run: images seen per optimiser step."""
    config = json.loads((Path(run_dir) / RUN_CONFIG_NAME).read_text())
    return int(config["batch_size"]) * int(config.get("accum_freq") or 1)


def train_with_checkpoints(study: Study, experiment: str, variant: str, seed: int, **overrides) -> Path:
    """A run that keeps a checkpoint every eighth of its steps, for accuracy against images seen."""
    steps = overrides.get("steps") or study.scale.steps
    every = max(1, steps // CHECKPOINT_FRACTIONS)
    return study.train(experiment, variant, seed, save_every=every, keep=steps // every + 1, **overrides)


def curve_steps(run_dir: Path) -> list[int]:
    """The kept checkpoints' steps at 1, 2, 4, ... times the first one, and the last: spaced evenly on a log
    axis of images seen, so the early, fast-changing part of training has points too."""
    steps = [step for step, folder in step_folders(run_dir) if is_complete(folder)]
    if not steps:
        raise RuntimeError(f"{run_dir} has no complete checkpoint to score; delete it and run the study again")
    doubling = [s for s in steps if s % steps[0] == 0 and (s // steps[0]) & (s // steps[0] - 1) == 0]
    return sorted(set(doubling) | {steps[-1]})


def scored_checkpoints(study: Study, run_dir: Path, score, steps: Sequence[int] | None = None) -> list[tuple]:
    """``(images seen, score(model, preprocess))`` for each kept checkpoint of a run (or those of ``steps``),
    oldest first."""
    batch, wanted = images_per_step(run_dir), None if steps is None else set(steps)
    points = [(float(step * batch), score(*study.load(folder))) for step, folder in step_folders(run_dir)
              if is_complete(folder) and (wanted is None or step in wanted)]
    if not points:
        raise RuntimeError(f"{run_dir} has no complete checkpoint to score; delete it and run the study again")
    return points


def accuracy_curve(study: Study, run_dir: Path, evalset) -> list[tuple[float, float]]:
    """Zero-shot top-1 against images seen, at the checkpoints of :func:`curve_steps`."""
    return scored_checkpoints(study, run_dir, lambda model, preprocess: study.zeroshot_top1(model, preprocess,
                                                                                            evalset),
                              curve_steps(run_dir))


def final_top1(study: Study, run_dir: Path, evalset) -> float:
    """Zero-shot top-1 of a run's newest checkpoint."""
    model, preprocess = study.load(run_dir)
    return study.zeroshot_top1(model, preprocess, evalset)


def final_loss(run_dir: Path, last: int = 5) -> float:
    """The training loss averaged over a run's last ``last`` logged records (one record is noisy)."""
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r and "val" not in r][-last:]
    if not losses:
        raise RuntimeError(f"{run_dir} logged no training loss; delete it and run the study again")
    return statistics.fmean(losses)


def against_baseline(study: Study, baseline: str, variant: str, experiment: str, run_name: str,
                     **overrides) -> dict[str, list[Path]]:
    """The run directories, per seed, of the shared baseline (named ``baseline``) and of one variant trained
    with ``overrides`` (named ``variant``; stored as ``runs/<experiment>/<run_name>-seed<k>``)."""
    return {baseline: [study.baseline(seed) for seed in study.seed_range()],
            variant: [study.train(experiment, run_name, seed, **overrides) for seed in study.seed_range()]}


def objectives(study: Study) -> Result:
    """Experiment 1 [sec. 2.3, Fig. 2]: one image tower trained contrastive, bag-of-words and captioning for
    the same images; zero-shot top-1 on held-out pairs against images seen, and the images-needed ratios."""
    evalset = curve_evalset(study.heldout())
    steps = objective_steps(study.scale.steps)
    curves = {name: [accuracy_curve(study, train_with_checkpoints(study, "objectives", name, seed, loss=name,
                                                                  steps=steps), evalset)
                     for seed in study.seed_range()] for name in OBJECTIVES}
    means = {name: mean_curve(runs) for name, runs in curves.items()}
    floor = chance_floor(len(evalset.classnames), len(evalset.labels))
    ratios = {(fast, slow): efficiency(means[fast], means[slow], floor) for fast, slow, _ in PAPER_EFFICIENCY}
    verdict, agrees = _objectives_verdict(ratios, floor)
    return Result(
        name="objectives", title="Objective efficiency", section="2.3, Fig. 2",
        paper="Contrastive training reaches the bag-of-words model's zero-shot ImageNet accuracy with about 4x fewer "
              "images, and bag-of-words prediction the Transformer language model's with about 3x fewer (Fig. 2).",
        table=_objectives_table(curves, ratios, len(evalset.labels)), figure=_curves_figure(curves, ratios, 1 / len(evalset.classnames)),
        verdict=verdict, agrees=agrees, numbers=_objectives_numbers(curves, means, ratios, floor))


def objective_steps(scale_steps: int) -> int:
    """Steps of each objective's run: the scale's divided by :data:`OBJECTIVE_STEPS_DIVISOR`, in whole eighths
    (so the doubling checkpoints end at the last step), or at least :data:`MIN_CURVE_STEPS`."""
    steps = scale_steps // OBJECTIVE_STEPS_DIVISOR
    steps -= steps % CHECKPOINT_FRACTIONS
    return steps if steps >= CHECKPOINT_FRACTIONS else min(scale_steps, MIN_CURVE_STEPS)


def curve_evalset(evalset):
    """The first :data:`CURVE_IMAGES` images of an evaluation set, with its first template only."""
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
        row = {"variant": OBJECTIVES[name], "images seen": int(runs[0][-1][0]),
               f"zero-shot top-1 ({num_images} images, 1 template)": mean_std([run[-1][1] for run in runs]),
               "data efficiency": ""}
        for (fast, slow), (level, ratio) in ratios.items():
            if fast == name:
                row["data efficiency"] = (f"undetermined against {OBJECTIVES[slow]}" if ratio.undetermined
                                          else f"{ratio.describe(unit='x')} {OBJECTIVES[slow]}'s")
        rows.append(row)
    return rows


def _ratio_claim(fast: str, slow: str, paper: float, level: float, ratio: Span,
                 floor: float) -> tuple[str, bool | None]:
    """One comparison in words, and whether it agrees with the paper's direction (None: the runs cannot tell)."""
    target = "the latter's final accuracy" if level > floor else "an accuracy clearly above chance"
    if ratio.undetermined:
        return (f"these checkpoints cannot tell whether {OBJECTIVES[fast]} is more data-efficient than "
                f"{OBJECTIVES[slow]} (images to reach {target}, {level:.1%}; paper: about {paper:g}x)"), None
    text = (f"{OBJECTIVES[fast]} was {ratio.describe(unit='x')} as data-efficient as {OBJECTIVES[slow]} (images "
            f"each needed to reach {target}, {level:.1%}; paper: about {paper:g}x)")
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
        line, = axes.plot([x for x, _ in mean], [a for _, a in mean], marker="o", label=OBJECTIVES[name])
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


def projection(study: Study) -> Result:
    """Experiment 2 [sec. 2.4]: CLIP's linear projection (the baseline run) against a two-layer MLP head."""
    evalset = study.heldout()
    runs = against_baseline(study, "linear", "mlp", "projection", "mlp", projection="mlp")
    top1 = {name: [final_top1(study, run, evalset) for run in found] for name, found in runs.items()}
    loss = {name: [final_loss(run) for run in found] for name, found in runs.items()}
    difference, margin, same = compare(top1["mlp"], top1["linear"], len(evalset.labels))
    verdict = (f"{'Agrees' if same else 'Does not agree'}: the MLP head's zero-shot top-1 is {difference:+.1%} from "
               f"the linear projection's, {'within' if same else 'outside'} the noise margin of +/-{margin:.1%} "
               f"(two standard errors: evaluation images and seeds{margin_caveat(study.seeds)}).")
    return Result(
        name="projection", title="Linear against MLP projection head", section="2.4",
        paper="CLIP maps each encoder's representation to the embedding space with a linear projection only: the "
              "authors noticed no difference in training efficiency against a non-linear (SimCLR-style MLP) "
              "projection and chose the linear one (no numbers given).",
        table=[{"variant": name, "zero-shot top-1": mean_std(top1[name]), "final training loss": mean_std(loss[name])}
               for name in runs],
        figure=bar_figure("Projection head", top1), verdict=verdict, agrees=same,
        numbers={"zeroshot_top1": top1, "final_loss": loss, "difference": difference, "noise_margin": margin})


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
