"""Experiment 4 of ``clipforge study`` (Radford et al. 2021, sec. 2.4-2.5): the baseline's Transformer text
encoder against a continuous bag-of-words one, on the built-in data.
"""
from __future__ import annotations

from clipforge.apps.study.figures import bar_figure
from clipforge.apps.study.framework import Result, Study, against_baseline, compare, final_top1, mean_std


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
