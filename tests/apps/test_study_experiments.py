"""Experiments 1, 2, 3 and 7 of ``clipforge study`` (objectives, projection, temperature, robustness): the
images-needed arithmetic and the effective-robustness trend against hand computations, then each experiment
run for real at the smoke scale (one shared study: the baseline CLIP run is trained once)."""
import dataclasses
import json
import math

import pytest

from clipforge.io.runs import MODEL_FILES, step_folder, step_folders
from clipforge.apps.study import framework
from clipforge.apps.study.experiments.objectives import (CURVE_IMAGES, OBJECTIVE_LABELS, Span, _objectives_verdict,
                                                         chance_floor, curve_evalset, curve_steps, efficiency,
                                                         images_to_reach, mean_curve, objective_steps, objectives)
from clipforge.apps.study.experiments.projection import projection
from clipforge.apps.study.experiments.robustness import (MODELS, SHIFTED_STYLES, TRAIN_STYLE, Trend,
                                                         effective_robustness, logit, robustness, sigmoid)
from clipforge.apps.study.experiments.temperature import FIXED_TEMPERATURES, temperature
from clipforge.apps.study.framework import noise_margin

FAST = [(100, 0.2), (200, 0.5), (300, 0.6), (400, 0.7)]
SLOW = [(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)]


def test_images_needed_is_interpolated_between_the_points_that_straddle_the_level():
    # FAST crosses 0.4 between (100, 0.2) and (200, 0.5): 100 + (0.4 - 0.2) / (0.5 - 0.2) * 100
    assert images_to_reach(FAST, 0.4) == Span(100 + 200 / 3, 100 + 200 / 3)
    assert images_to_reach(SLOW, 0.4) == Span(400.0, 400.0)  # reached exactly at its last point


def test_efficiency_ratio_of_a_hand_made_curve_pair():
    level, ratio = efficiency(FAST, SLOW)
    assert level == 0.4
    assert ratio.exact and ratio.low == pytest.approx(400 / (100 + 200 / 3))  # 2.4
    assert ratio.describe(unit="x") == "2.4x"


def test_a_curve_that_never_reaches_the_level_is_a_bound_not_a_number():
    never = [(100, 0.1), (200, 0.15)]
    needed = images_to_reach(never, 0.4)
    assert (needed.low, needed.high, needed.strict) == (200.0, math.inf, True)
    assert needed.describe() == "more than 200"
    level, ratio = efficiency(never, SLOW)  # the "faster" run never reaches SLOW's 0.4: SLOW's 400 / more than 200
    assert (ratio.low, ratio.high) == (0.0, 2.0) and ratio.describe(unit="x") == "less than 2x"
    assert ratio.to_dict()["high"] == 2.0 and json.dumps(ratio.to_dict())


def test_a_level_reached_at_the_first_point_gives_a_lower_bound_on_the_ratio():
    early = [(100, 0.5), (200, 0.6)]
    assert images_to_reach(early, 0.4) == Span(0.0, 100.0)  # nothing is known before the first checkpoint
    _, ratio = efficiency(early, SLOW)
    assert (ratio.low, ratio.high, ratio.describe(unit="x")) == (4.0, math.inf, "at least 4x")


def test_mean_curve_and_noise_margin():
    assert mean_curve([[(1, 0.2), (2, 0.4)], [(1, 0.4), (2, 0.6)]]) == [(1, pytest.approx(0.3)), (2, 0.5)]
    # one seed each: two binomial standard errors of a difference, sqrt(2 * 0.5 * 0.5 / 100) * 2
    assert noise_margin([0.5], [0.5], 100) == pytest.approx(2 * math.sqrt(0.005))
    # seeds' spread adds its variance of the mean: var([0.4, 0.6]) / 2 = 0.01
    assert noise_margin([0.4, 0.6], [0.5], 100) == pytest.approx(2 * math.sqrt(0.0025 + 0.01 + 0.0025))


def test_objective_runs_are_a_third_of_the_scale_in_eighths_scored_at_doubling_steps(tmp_path):
    assert [objective_steps(n) for n in (300, 400, 3, 10)] == [296, 400, 3, 8]
    for step in (12, 24, 36, 48, 60, 72, 84, 96, 100):
        folder = step_folder(tmp_path, step)
        folder.mkdir(parents=True)
        for name in MODEL_FILES if step != 84 else ():  # 84: an incomplete checkpoint, never scored
            (folder / name).write_text("{}")
    assert curve_steps(tmp_path) == [12, 24, 48, 96, 100]


def test_trend_is_a_least_squares_line_in_logit_space():
    xs = [0.3, 0.5, 0.8]
    points = [(x, sigmoid(-1.0 + 0.5 * logit(x))) for x in xs]
    trend = Trend.fit(points)
    assert trend.intercept == pytest.approx(-1.0) and trend.slope == pytest.approx(0.5)
    single = Trend.fit([(0.8, 0.5)])  # one point: slope 1 through it
    assert single.slope == 1.0 and single.predict(0.8) == pytest.approx(0.5)


def test_effective_robustness_and_the_gap_closed():
    trend = Trend(0.0, 1.0)  # predicts y = x: no gap to close
    assert effective_robustness(trend, 0.6, 0.5) == (pytest.approx(-0.1), None)
    halving = Trend.fit([(0.8, 0.4)])  # predicts 0.4 at 0.8: a gap of 0.4
    robustness, closed = effective_robustness(halving, 0.8, 0.7)
    assert robustness == pytest.approx(0.3) and closed == pytest.approx(0.75)


# ---------------------------------------------------------------------------- the experiments, run
# The smoke scale with fewer evaluation images: the caption model's scorer decodes every (image, prompt) pair.
SCALE = dataclasses.replace(framework.SCALES["smoke"], eval_samples=24)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return framework.Study(tmp_path_factory.mktemp("study"), SCALE, seeds=1, progress=False)


def _check_result(result, name: str):
    assert result.name == name and result.title and result.section and result.paper
    assert result.verdict and result.agrees in (True, False, None)
    assert result.table and all(row.get("variant") for row in result.table)
    assert result.figure.axes  # a matplotlib Figure with a plot in it
    json.dumps(result.numbers)  # saved with the result


@pytest.mark.slow
def test_objectives_curves_come_from_the_runs_checkpoints(study):
    result = objectives(study)
    _check_result(result, "objectives")
    curves = result.numbers["curves"]
    assert set(curves) == set(OBJECTIVE_LABELS)
    steps = [step for step, _ in step_folders(study.run_dir("objectives", "caption", 0))]
    assert steps == [1, 2, 3]  # every checkpoint kept, one per step at 3 steps
    for name, (curve,) in curves.items():
        assert [x for x, _ in curve] == [step * SCALE.batch_size for step in steps]
        assert all(0 <= a <= 1 for _, a in curve)
    # the last point is the final checkpoint's zero-shot top-1, scored again here
    evalset = curve_evalset(study.heldout())
    assert len(evalset.labels) == min(CURVE_IMAGES, SCALE.eval_samples) and len(evalset.templates) == 1
    model, preprocess = study.load(study.run_dir("objectives", "bow", 0))
    assert study.zeroshot_top1(model, preprocess, evalset) == curves["bow"][0][-1][1]
    for comparison in result.numbers["comparisons"].values():
        ratio = comparison["ratio"]
        assert ratio["low"] >= 0 and (ratio["high"] is None or ratio["high"] >= ratio["low"])
        assert ratio["text"] in result.verdict or ratio["text"] == "undetermined"


@pytest.mark.slow
def test_projection_compares_the_baseline_with_an_mlp_head(study):
    result = projection(study)
    _check_result(result, "projection")
    top1 = result.numbers["zeroshot_top1"]
    assert set(top1) == {"linear", "mlp"} and all(0 <= a <= 1 for v in top1.values() for a in v)
    assert result.numbers["difference"] == pytest.approx(top1["mlp"][0] - top1["linear"][0])
    config = json.loads((study.run_dir("projection", "mlp", 0) / "run_config.json").read_text())
    assert config["projection"] == "mlp"
    assert result.agrees == (abs(result.numbers["difference"]) <= result.numbers["noise_margin"])


@pytest.mark.slow
def test_temperature_runs_fixed_temperatures_against_the_learned_one(study):
    result = temperature(study)
    _check_result(result, "temperature")
    rows = {row["variant"]: row for row in result.table}
    assert list(rows) == ["learned"] + [f"fixed {t:g}" for t in FIXED_TEMPERATURES]
    for t in FIXED_TEMPERATURES:  # a fixed temperature stays where it was set
        assert rows[f"fixed {t:g}"]["final temperature"]["mean"] == pytest.approx(t, rel=1e-5)
    learned = result.numbers["learned_logit_scale"][0]
    assert 1 <= learned <= 100 and rows["learned"]["final temperature"]["mean"] == pytest.approx(1 / learned)
    assert all(0 <= a <= 1 for values in result.numbers["zeroshot_top1"].values() for a in values)


def test_robustness_scores_every_model_on_every_style(study):
    result = robustness(study)
    _check_result(result, "robustness")
    (accuracy,) = result.numbers["accuracy"]
    assert set(accuracy) == set(MODELS)
    for model in MODELS:
        assert set(accuracy[model]) == {TRAIN_STYLE, *SHIFTED_STYLES}
        assert all(0 <= a <= 1 for a in accuracy[model].values())
    (checkpoints,) = result.numbers["classifier_checkpoints"]
    assert len(checkpoints) == 3 and checkpoints[-1] == accuracy["supervised classifier"]
    # effective robustness recomputed from the stored trend and accuracies
    clip = accuracy["zero-shot CLIP"]
    trends = {style: Trend(**t) for style, t in result.numbers["trends"].items()}
    expected = sum(clip[s] - trends[s].predict(clip[TRAIN_STYLE]) for s in SHIFTED_STYLES) / len(SHIFTED_STYLES)
    got = result.numbers["effective_robustness"]["zero-shot CLIP"][0]["effective_robustness"]
    assert got == pytest.approx(expected)


@pytest.mark.slow
def test_another_seed_changes_the_numbers(study):
    two = framework.Study(study.output, SCALE, seeds=2, progress=False)  # reuses seed 0's runs, trains seed 1
    result = projection(two)
    for name, losses in result.numbers["final_loss"].items():
        assert len(losses) == 2 and losses[0] != losses[1], name
    assert result.table[0]["zero-shot top-1"]["std"] >= 0


def test_against_a_run_that_learnt_nothing_the_level_is_clearly_above_chance():
    floor = chance_floor(16, 128)
    assert floor == pytest.approx(1 / 16 + 2 * math.sqrt(1 / 16 * 15 / 16 / 128))  # 10.5%
    flat = [(100, 0.06), (200, 0.05), (300, 0.06), (400, 0.06)]  # never above chance + noise
    level, ratio = efficiency(FAST, flat, floor)
    assert level == floor  # FAST is there by its first point (<= 100), flat not in its 400: more than 4x
    assert (ratio.low, ratio.high, ratio.describe(unit="x")) == (4.0, math.inf, "more than 4x")
    level, ratio = efficiency(flat, flat, floor)
    assert ratio.undetermined
    verdict, agrees = _objectives_verdict({("contrastive", "bow"): efficiency(FAST, flat, floor),
                                           ("bow", "caption"): (level, ratio)}, floor)
    assert agrees is None and verdict.startswith("Inconclusive") and "more than 4x" in verdict
    assert "cannot tell whether" in verdict and "an accuracy clearly above chance, 10.5%" in verdict
    verdict, agrees = _objectives_verdict({("contrastive", "bow"): efficiency(FAST, SLOW, floor),
                                           ("bow", "caption"): efficiency(FAST, SLOW, floor)}, floor)
    assert agrees is True and verdict.startswith("Agrees in direction") and "2.4x" in verdict


def test_gap_closed_is_the_mean_robustness_over_the_mean_gap():
    from clipforge.apps.study.experiments.robustness import _mean_effective_robustness
    trends = {style: Trend.fit([(0.8, 0.4)]) for style in SHIFTED_STYLES}  # a gap of 0.4 at 0.8 in every style
    trends[SHIFTED_STYLES[0]] = Trend(0.0, 1.0)  # no gap in this one: it must not swamp the fraction
    accuracy = {TRAIN_STYLE: 0.8, **{style: 0.7 for style in SHIFTED_STYLES}}
    mean = _mean_effective_robustness(trends, accuracy)
    assert mean["effective_robustness"] == pytest.approx((-0.1 + 3 * 0.3) / 4)
    assert mean["gap_closed"] == pytest.approx(((-0.1 + 3 * 0.3) / 4) / (3 * 0.4 / 4))
