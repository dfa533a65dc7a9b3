"""Experiment 2 of ``clipforge study`` (Radford et al. 2021, sec. 2.4): CLIP's linear projection into the
joint space against a two-layer MLP head, on the built-in data.
"""
from __future__ import annotations

from clipforge.apps.study.figures import bar_figure
from clipforge.apps.study.framework import (
    Result,
    Study,
    against_baseline,
    compare,
    final_loss,
    final_top1,
    margin_caveat,
    mean_std,
)


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
